"""A generated embedding world with class structure and a distribution shift.

Used by ``ratta demo``, the tests and the benchmarks; nothing here is real data. Geometry:
each class c has a text anchor tau_c (classes come in groups of similar anchors, so the
zero-shot classifier confuses them) and an image centre mu_c = tau_c + a class-specific
offset (the modality gap). Each test image is a latent scene around mu_y plus a shift shared
by the whole test set; its center crop and its views are independent noisy crops of that
scene. Web images in the database are drawn around mu_c without the shift, plus unrelated
distractors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ratta.files import TextFeatures, save_database, save_features, save_text


@dataclass
class SyntheticWorld:
    text: TextFeatures
    image: Tensor  # [N, d]
    views: Tensor  # [N, V, d]
    labels: Tensor  # [N]
    database: np.ndarray  # [N_db, d]

    def write(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
        """Write features.safetensors, text.safetensors and db.npy into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "features": folder / "features.safetensors",
            "text": folder / "text.safetensors",
            "db": folder / "db.npy",
        }
        save_features(paths["features"], self.image.to(dtype), self.views.to(dtype), self.labels)
        save_text(paths["text"], self.text, {"source": "ratta.synthetic"})
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        save_database(paths["db"], self.database.astype(np_dtype))
        return paths


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def make_world(
    num_classes: int = 20,
    dim: int = 64,
    desc_per_class: tuple[int, int] = (8, 14),
    num_views: int = 32,
    num_test: int = 400,
    db_per_class: int = 60,
    db_distractors: int = 500,
    group_size: int = 4,
    confusion: float = 0.8,
    gap: float = 1.0,
    gap_spread: float = 0.3,
    shift: float = 0.3,
    image_noise: float = 0.8,
    view_noise: float = 0.6,
    crop_noise: float = 0.8,
    web_noise: float = 0.4,
    lean: float = 0.7,
    seed: int = 0,
) -> SyntheticWorld:
    """Generate a world; larger ``confusion``/``shift``/``crop_noise`` make zero-shot harder.

    Each test image is a latent scene ``raw`` (around mu_y, plus the test-set shift and
    per-image noise); the center crop x_0 and the V random views are independent noisy
    crops of it (``crop_noise``, ``view_noise``), so zero-shot sees a single noisy crop
    while RA-TTA's quantile scoring and OT pool all the views. Per-class modality gaps
    vary by a factor in [1 - gap_spread, 1 + gap_spread]; descriptions lean towards the
    image centre by up to ``lean``; web images lie around mu_c with ``web_noise``.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    groups = randn((num_classes + group_size - 1) // group_size, dim)
    group_of = torch.arange(num_classes) // group_size
    tau = _unit(
        confusion * _unit(groups[group_of]) + (1 - confusion) * _unit(randn(num_classes, dim))
    )
    spread = 2 * torch.rand(num_classes, 1, generator=g, dtype=torch.float64) - 1
    gaps = gap * (1 + gap_spread * spread)  # class-specific modality gap
    mu = _unit(tau + gaps * _unit(randn(num_classes, dim)) / np.sqrt(2))

    counts = torch.randint(desc_per_class[0], desc_per_class[1] + 1, (num_classes,), generator=g)
    desc_class = torch.repeat_interleave(torch.arange(num_classes), counts + 1)
    # description rows lean towards the class's image centre: they describe what it looks like
    lean_w = torch.rand(desc_class.shape[0], 1, generator=g, dtype=torch.float64)
    desc = _unit(
        tau[desc_class]
        + lean * lean_w * (mu - tau)[desc_class]
        + 0.08 * randn(desc_class.shape[0], dim)
    )
    templates = _unit(tau.unsqueeze(1) + 0.05 * randn(num_classes, 3, dim))
    classifier = torch.stack(
        [
            _unit(torch.cat([templates[c], desc[desc_class == c]]).mean(0))
            for c in range(num_classes)
        ]
    )
    text = TextFeatures(
        classifier=classifier.float(),
        desc=desc.float(),
        desc_class=desc_class,
        logit_scale=100.0,
        class_names=[f"class {c}" for c in range(num_classes)],
    )

    labels = torch.randint(0, num_classes, (num_test,), generator=g)
    shift_dir = _unit(randn(dim))
    noise = image_noise / np.sqrt(dim)
    raw = mu[labels] + shift * shift_dir + noise * randn(num_test, dim) * np.sqrt(dim) / 4
    # the center crop is one noisy crop of the scene, like the views
    image = _unit(raw + crop_noise * randn(num_test, dim) / np.sqrt(dim) * 2)
    views = _unit(
        raw.unsqueeze(1) + view_noise * randn(num_test, num_views, dim) / np.sqrt(dim) * 2
    )

    web = mu.repeat_interleave(db_per_class, 0)
    web = _unit(web + web_noise * randn(web.shape[0], dim) / np.sqrt(dim) * 4)
    database = torch.cat([web, _unit(randn(db_distractors, dim))])
    database = database[torch.randperm(database.shape[0], generator=g)]
    return SyntheticWorld(
        text=text,
        image=image.float(),
        views=views.float(),
        labels=labels,
        database=database.float().numpy(),
    )
