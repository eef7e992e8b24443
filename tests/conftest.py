from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from ratta.synthetic import SyntheticWorld, make_world


@pytest.fixture(scope="session")
def world() -> SyntheticWorld:
    return make_world(
        num_classes=12,
        dim=32,
        num_views=12,
        num_test=60,
        db_per_class=30,
        db_distractors=100,
        seed=123,
    )


@pytest.fixture()
def world_files(world: SyntheticWorld, tmp_path: Path) -> dict[str, Path]:
    return world.write(tmp_path / "in", dtype=torch.float32)


def stacked(world: SyntheticWorld) -> torch.Tensor:
    """[N, V+1, d] test embeddings of a world."""
    return torch.cat([world.image.unsqueeze(1), world.views], dim=1)


def as_numpy64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.double().numpy() if isinstance(t, torch.Tensor) else t.astype(np.float64)
