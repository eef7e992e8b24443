"""The Python API of the README: the engine fed from the documented files in three lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stacked
from safetensors.torch import load_file

import ratta
from ratta.adapt import adapt
from ratta.errors import RattaInputError
from ratta.synthetic import SyntheticWorld


def test_load_inputs_feeds_ratta_batch_as_adapt_does(
    world: SyntheticWorld, world_files: dict[str, Path], tmp_path: Path
) -> None:
    inputs = ratta.load_inputs(world_files["features"], world_files["text"], world_files["db"])
    res = ratta.ratta_batch(
        inputs.x,
        inputs.classifier,
        inputs.desc,
        inputs.desc_class,
        inputs.scale,
        inputs.retriever,
        ratta.RATTAConfig(),
    )
    assert torch.equal(inputs.x, stacked(world).float())
    assert inputs.retriever.embeddings.shape == world.database.shape
    assert torch.equal(inputs.labels, world.labels)
    assert inputs.class_names == world.text.class_names
    adapt(*(world_files[k] for k in ("features", "text", "db")), tmp_path / "p.safetensors")
    final = load_file(str(tmp_path / "p.safetensors"))["final"]
    torch.testing.assert_close(res.final, final)


def test_load_inputs_takes_dtype_device_and_views(world_files: dict[str, Path]) -> None:
    inputs = ratta.load_inputs(
        world_files["features"], world_files["text"], world_files["db"], dtype="float64", views=2
    )
    assert inputs.x.dtype == inputs.classifier.dtype == torch.float64
    assert inputs.x.shape[1] == 3 and inputs.x.device.type == "cpu"


def test_load_inputs_checks_the_files_as_adapt_does(world_files, tmp_path: Path) -> None:
    bad = tmp_path / "db.npy"
    np.save(bad, (np.ones((4, 7)) / np.sqrt(7)).astype(np.float32))
    with pytest.raises(RattaInputError, match="dimension 7"):
        ratta.load_inputs(world_files["features"], world_files["text"], bad)
    with pytest.raises(RattaInputError, match="--dtype"):
        ratta.load_inputs(*(world_files[k] for k in ("features", "text", "db")), dtype="int8")
