"""``ratta run``: extract -> text -> adapt for one dataset, with content-addressed caches.

Features are cached under ``<cache>/features/<key>.safetensors`` where the key hashes the
backbone (architecture, checkpoint hash or tag, precision), preprocessing, views, seed,
stored dtype and the split (paths, labels, class names); text features under
``<cache>/text/<key>.safetensors`` keyed by the backbone, class names, templates, prefix and
the descriptions file's hash. A rerun, or a change of adaptation hyperparameters, reuses
them; the backbone is only loaded when something has to be computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratta.adapt import adapt
from ratta.backbones import Backbone, BackboneSpec, backbone_fingerprint, load_backbone
from ratta.config import RATTAConfig
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings, extract_features
from ratta.files import write_json
from ratta.presets import DatasetPreset, get_preset
from ratta.text import build_text_features, cache_dir, fetch_published_descriptions

if TYPE_CHECKING:
    from ratta.distributed import RayBackend

# Text settings for the user's own datasets (``folder``, ``csv``) unless --preset is given.
CUSTOM_PRESET = "caltech101"
# Bumped when the text file gains content (2: baseline classifiers), so caches refresh.
TEXT_FORMAT = 2


def _cached(root: Path, stage: str, payload: dict[str, Any]) -> tuple[Path, bool]:
    """The cache file of ``stage`` for the inputs ``payload`` (named by their hash), and
    whether it exists; its folder is created."""
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    path = root / stage / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.is_file()


def dataset_preset(dataset: str, preset: str | None = None) -> DatasetPreset:
    """The text preset of a dataset; custom datasets default to the generic object preset."""
    if preset:
        return get_preset(preset)
    return get_preset(CUSTOM_PRESET if dataset in ("folder", "csv") else dataset)


def resolve_descriptions(descriptions: str, preset: DatasetPreset) -> Path:
    """A CuPL JSON path; ``auto`` downloads the published file of the preset's dataset."""
    if descriptions == "auto":
        return fetch_published_descriptions(preset.cupl_stem)
    path = Path(descriptions)
    if not path.is_file():
        raise RattaInputError(f"--descriptions {path}: file not found")
    return path


@dataclass
class _LazyBackbone:
    spec: BackboneSpec
    device: str
    loaded: Backbone | None = field(default=None)

    def get(self) -> Backbone:
        if self.loaded is None:
            self.loaded = load_backbone(self.spec, self.device)
        return self.loaded


def run(
    dataset: str,
    data_root: str | os.PathLike[str],
    db: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backbone: BackboneSpec | None = None,
    settings: ExtractSettings | None = None,
    descriptions: str = "auto",
    preset: str | None = None,
    class_names_file: str | None = None,
    allow_missing: bool = False,
    config: RATTAConfig | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    forward_batch: int = 256,
    workers: int = 2,
    adapt_batch_size: int = 256,
    dtype: str = "float32",
    adapt_views: int | None = None,
    progress: bool = False,
    backend: RayBackend | None = None,
) -> dict[str, Any]:
    """Chain the three stages; returns the adaptation summary with a ``cache`` section.

    ``adapt_views`` adapts with only the first V' of the extracted views (view sweeps reuse
    one extraction). With ``backend``, extraction and adaptation run on Ray workers (on
    ``device``), the text stage on this process's CPU; the cached files are the same.
    """
    from ratta.datasets import load_split

    spec = backbone or BackboneSpec()
    settings = settings or ExtractSettings()
    pre = dataset_preset(dataset, preset)
    config = config or replace(RATTAConfig(), quantile=pre.quantile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cache) if cache else cache_dir()
    split = load_split(dataset, data_root, csv_classes=class_names_file)
    desc_path = resolve_descriptions(descriptions, pre)
    bb_fp = backbone_fingerprint(spec)
    lazy = _LazyBackbone(spec, "cpu" if backend is not None else device)
    started = time.perf_counter()

    features, feat_hit = _cached(
        root,
        "features",
        {
            "backbone": bb_fp,
            "views": settings.views,
            "seed": settings.seed,
            "dtype": settings.dtype,
            "split": split.fingerprint(),
            "dataset": dataset,
        },
    )
    if not feat_hit:
        extract_features(
            [p for p, _ in split.items],
            [y for _, y in split.items],
            lazy.get(),
            features,
            settings,
            batch_size=batch_size,
            forward_batch=forward_batch,
            workers=workers,
            metadata={"dataset": dataset, "split": split.fingerprint()},
            progress=progress,
            backend=backend,
        )

    desc_hash = hashlib.sha256(desc_path.read_bytes()).hexdigest()
    text, text_hit = _cached(
        root,
        "text",
        {
            "backbone": bb_fp,
            "classes": split.class_names,
            "templates": list(pre.templates),
            "pre": pre.pre,
            "descriptions": desc_hash,
            "allow_missing": allow_missing,
        },
    )
    if not text_hit:
        build_text_features(
            split.class_names,
            desc_path,
            pre.templates,
            pre.pre,
            lazy.get(),
            text,
            allow_missing=allow_missing,
            metadata={"dataset": dataset},
        )

    summary = adapt(
        features,
        text,
        db,
        out / "predictions.safetensors",
        config,
        batch_size=adapt_batch_size,
        device=device,
        dtype=dtype,
        views=adapt_views,
        progress=progress,
        backend=backend,
    )
    summary["dataset"] = dataset
    summary["cache"] = {
        "features": str(features),
        "features_reused": feat_hit,
        "text": str(text),
        "text_reused": text_hit,
        "backbone_loaded": lazy.loaded is not None,
    }
    summary["run_seconds"] = round(time.perf_counter() - started, 3)
    write_json(out / "results.json", summary)
    return summary
