from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from ratta.synthetic import SyntheticWorld, make_world


@pytest.fixture(autouse=True)
def _tracebacks(monkeypatch) -> None:
    """Tests see an unexpected exception itself, not the command line's last-resort line:
    every error a test expects must be a deliberate one-line error."""
    monkeypatch.setenv("RATTA_TRACEBACK", "1")


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


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised small open_clip model: its JSON config and a checkpoint file."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    checkpoint = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"config": config, "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip):
    """The tiny model loaded through ratta's backbone loader."""
    from ratta.backbones import BackboneSpec, load_backbone

    spec = BackboneSpec(
        model=None, pretrained=str(tiny_clip["checkpoint"]), model_config=str(tiny_clip["config"])
    )
    return load_backbone(spec)


def adapt_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``ratta adapt`` arguments for the features, text and db paths of ``paths``."""
    return [
        "adapt",
        "--features",
        str(paths["features"]),
        "--text",
        str(paths["text"]),
        "--db",
        str(paths["db"]),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def tiny_args(tiny_clip) -> list[str]:
    """The backbone flags of the tiny random-weight model."""
    return [
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
    ]


def extract_argv(tiny_clip, root: Path, *extra: str, dataset: str = "dtd") -> list[str]:
    """``ratta extract`` of ``dataset`` under ``root`` with the tiny model, in-process decoding."""
    argv = ["extract", "--dataset", dataset, "--data-root", str(root), "--workers", "0"]
    return [*argv, "--quiet", *tiny_args(tiny_clip), *extra]


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Small random RGB images of varied sizes and formats."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        path = folder / f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


DTD_CLASSES = ["zigzagged", "banded", "woven_fabric"]  # label order of the split file


def make_coop(
    root: Path, dataset: str, classes: list[str], per_class: int = 3, seed: int = 0
) -> tuple[list[Path], list[int]]:
    """A test split in CoOp's layout (split JSON + real images) for a CoOp-json dataset.

    Returns the image paths and labels in the split's (shuffled) test order.
    """
    import json

    from ratta.datasets import DATASETS

    info = DATASETS[dataset]
    test = []
    for label, name in enumerate(classes):
        paths = write_images(root / info.images / name, per_class, seed=seed + label)
        test += [[f"{name}/{p.name}", label, name] for p in paths]
    order = list(np.random.default_rng(seed).permutation(len(test)))
    test = [test[i] for i in order]
    split_file = root / info.files[0]
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps({"train": [], "val": [], "test": test}))
    return [root / info.images / t[0] for t in test], [t[1] for t in test]


def make_coop_dtd(root: Path, per_class: int = 3, seed: int = 0) -> tuple[list[Path], list[int]]:
    """A DTD test split in CoOp's layout with real images; returns paths and labels in order."""
    return make_coop(root, "dtd", DTD_CLASSES, per_class, seed)


def reference_pickle(path: Path, array: np.ndarray, protocol: int = 4) -> Path:
    """The reference code's released format: a dict whose 'embedding' key holds [N, d]."""
    with open(path, "wb") as fh:
        pickle.dump({"embedding": array, "note": "LAION2B", "n": len(array)}, fh, protocol)
    return path


def write_clip_corpus(
    root: Path, shards: list[tuple[np.ndarray, list[str | None], list[str]]]
) -> Path:
    """A clip-retrieval output folder: img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, (emb, captions, urls) in enumerate(shards):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", emb.astype(np.float16))
        table = pa.table(
            {
                "url": urls,
                "caption": pa.array(captions, pa.string()),
                "key": [f"{i:05d}{r:04d}" for r in range(len(urls))],
                "similarity": np.zeros(len(urls), np.float32),
            }
        )
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
    return root
