"""``ratta run``: extract -> text -> adapt for one dataset, with content-addressed caches.

Features are cached under ``<cache>/features/<key>.safetensors`` and text features under
``<cache>/text/<key>.safetensors``, where each key hashes the identity of everything that
changes the numbers (see :mod:`ratta.identity` for the rules and their cost):

- features: ratta's features format, the backbone (architecture and config content, tag or
  checkpoint sha256, precision, device type), views, seed, stored dtype, and the split: its
  listing (relative paths, labels, class names), the sha256 of its split files, every
  image's size and modification time, and the data root's resolved path;
- text: ratta's text format, the backbone, class names, templates, prefix, the descriptions
  file's sha256, ``allow_missing`` and the templates of the peers' paper classifiers.

A rerun, or a change of adaptation hyperparameters, reuses them without loading the
backbone; ``force`` recomputes them. ``results.json`` records the identities, and a rerun
into the same folder says which input changed when a stage is recomputed.

Everything that can be checked without the model is checked before the first expensive
stage: the split, the descriptions' coverage of the classes, the database's header and its
dimension against the backbone's embedding size, the hyperparameters, the output and cache
folders.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratta.adapt import adapt
from ratta.backbones import (
    Backbone,
    BackboneSpec,
    backbone_fingerprint,
    check_precision,
    embed_dim,
    load_backbone,
)
from ratta.config import RATTAConfig
from ratta.db.search import DatabaseCache
from ratta.devices import resolve_device
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings, extract_features
from ratta.files import write_json, write_text_atomic
from ratta.guard import Read, Write, claim, output_files
from ratta.identity import changes, database_identity, file_sha256, files_stamp, key_of
from ratta.peers.prompts import paper_templates
from ratta.presets import DatasetPreset, get_preset
from ratta.progress import Progress, within
from ratta.summary import format_results
from ratta.text import (
    build_text_features,
    cache_dir,
    fetch_published_descriptions,
    load_descriptions,
    match_descriptions,
)

if TYPE_CHECKING:
    from ratta.datasets.split import Split
    from ratta.distributed import RayBackend

# Text settings for the user's own datasets (``folder``, ``csv``) unless --preset is given.
CUSTOM_PRESET = "caltech101"
# Formats of the cached files; bumped when their content or identity rules change, so that
# caches of an older ratta are recomputed (text 2: baseline classifiers; 3 and features 2:
# content identities; text 4: the peers' paper classifiers).
TEXT_FORMAT = 4
FEATURES_FORMAT = 2
RESULT_FILES = ("results.json", "results.md")


class RattaRunWarning(UserWarning):
    """Something the user must know about a run's numbers (skipped images, no candidates)."""


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
class Loaded:
    """What ``ratta eval`` and ``ratta sweep`` keep loaded from one cell to the next: the
    backbones (one per spec and device) and the last database opened for search, so each
    is loaded once per run rather than once per cell."""

    backbones: dict[tuple[BackboneSpec, str, str], Backbone] = field(default_factory=dict)
    databases: DatabaseCache = field(default_factory=DatabaseCache)

    def backbone(self, spec: BackboneSpec, device: str, runs_on: str) -> Backbone:
        if (spec, device, runs_on) not in self.backbones:
            self.backbones[spec, device, runs_on] = load_backbone(spec, device, runs_on=runs_on)
        return self.backbones[spec, device, runs_on]


@dataclass
class _LazyBackbone:
    spec: BackboneSpec
    device: str
    runs_on: str
    shared: Loaded | None = None
    loaded: Backbone | None = field(default=None)

    def get(self) -> Backbone:
        if self.loaded is None:
            if self.shared is not None:
                self.loaded = self.shared.backbone(self.spec, self.device, self.runs_on)
            else:
                self.loaded = load_backbone(self.spec, self.device, runs_on=self.runs_on)
        return self.loaded


def split_identity(split: Split) -> dict[str, Any]:
    """The split's listing, the sha256 of its files, every image's size and modification
    time, and the resolved data root."""
    return {
        "listing": split.fingerprint(),
        "files": {str(f): file_sha256(f, "split file") for f in split.files},
        "images": files_stamp(p for p, _ in split.items),
        "root": str(split.root),
    }


@dataclass
class Plan:
    """What one run will compute, all checked before any expensive stage (``database``:
    None for a run that only needs the features and the text, such as the peers')."""

    split: Split
    preset: DatasetPreset
    descriptions: Path
    features: dict[str, Any]
    text: dict[str, Any]
    database: dict[str, Any] | None
    config: RATTAConfig
    reads: list[Read]
    no_candidates: str | None = None

    def features_path(self, cache: Path) -> Path:
        return cache / "features" / f"{key_of(self.features)}.safetensors"

    def text_path(self, cache: Path) -> Path:
        return cache / "text" / f"{key_of(self.text)}.safetensors"


def plan_run(
    dataset: str,
    data_root: str | os.PathLike[str],
    db: str | os.PathLike[str] | None,
    *,
    spec: BackboneSpec,
    settings: ExtractSettings,
    descriptions: str,
    preset: str | None = None,
    class_names_file: str | None = None,
    allow_missing: bool = False,
    config: RATTAConfig | None,
    device: str,
    on_ray: bool = False,
    tf32: bool = False,
) -> Plan:
    """Check every input that can be checked without the model, and name the caches.

    ``device`` is where images are encoded; text is encoded there too, except ``on_ray``,
    where the driver encodes it on its CPU. ``tf32``: TF32 allowed on CUDA (``--tf32``), part
    of the backbone's identity there. ``db`` None: no database (no adaptation planned).
    """
    from ratta.datasets import load_split
    from ratta.db import inspect_database

    pre = dataset_preset(dataset, preset)
    config = config or replace(RATTAConfig(), quantile=pre.quantile)
    split = load_split(dataset, data_root, csv_classes=class_names_file)
    desc_path = resolve_descriptions(descriptions, pre)
    per_class, _ = match_descriptions(
        split.class_names, load_descriptions(desc_path), str(desc_path), allow_missing
    )
    check_precision(spec, device)
    dim = embed_dim(spec)
    header = inspect_database(db) if db is not None else None
    if header is not None and dim is not None and header.dim != dim:
        raise RattaInputError(
            f"--db {db}: database rows have dimension {header.dim} but the backbone "
            f"{spec.model or spec.model_config} embeds in {dim}"
        )
    features = {
        "format": FEATURES_FORMAT,
        "backbone": backbone_fingerprint(spec, device, tf32),
        "views": settings.views,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "dataset": dataset,
        "split": split_identity(split),
    }
    text = {
        "format": TEXT_FORMAT,
        "backbone": backbone_fingerprint(spec, "cpu" if on_ray else device, tf32),
        "classes": split.class_names,
        "templates": list(pre.templates),
        "pre": pre.pre,
        "descriptions": file_sha256(desc_path, "--descriptions"),
        "allow_missing": allow_missing,
        "peer_templates": paper_templates(pre.name),
    }
    rows = [len(d) + 1 if d else len(pre.templates) + 1 for d in per_class]
    reads = [
        *split.reads(),
        *Read.of(desc_path, "--descriptions"),
        *(Read.of(db, "--db") if db is not None else []),
        *spec.reads(),
    ]
    return Plan(
        split,
        pre,
        desc_path,
        features,
        text,
        database_identity(db) if db is not None else None,
        config,
        reads,
        no_candidates_reason(rows, config),
    )


def no_candidates_reason(rows_per_class: list[int], config: RATTAConfig) -> str | None:
    """Why no class can survive step 3 whatever the image, or None.

    A class survives when it owns at least min_desc of the K_D top description rows; if
    every class owns fewer rows than that, RA-TTA always falls back to zero-shot.
    """
    most = max(rows_per_class, default=0)
    if most >= config.min_desc and config.k_d >= config.min_desc:
        return None
    if config.k_d < config.min_desc:
        return (
            f"K_D = {config.k_d} is below min_desc = {config.min_desc}: no class can own "
            "min_desc of the top descriptions, so RA-TTA equals zero-shot"
        )
    return (
        f"every class has at most {most} description rows, fewer than min_desc = "
        f"{config.min_desc} (e.g. templates-only descriptions): no class can survive, so "
        "RA-TTA equals zero-shot; lower --min-desc or use LLM descriptions"
    )


def _previous(out: Path) -> dict[str, Any]:
    """The identities of the last run written into ``out`` (empty if none or unreadable)."""
    try:
        return json.loads((out / "results.json").read_text()).get("identity", {}) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def reason(
    reused: bool, force: bool, old: Any, new: dict[str, Any], where: str = "in the cache"
) -> str:
    """Why a stage was reused or computed, for results.json and the printed summary."""
    if reused:
        return f"reused ({where})"
    if force:
        return "computed: --force"
    if not old:
        return f"computed: not {where}"
    changed = changes(old, new)
    if not changed:
        return f"computed: not {where} (it was removed)"
    return "computed: changed " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")


def cached(
    path: Path, flag: str, reads: list[Read], force: bool, compute: Callable[[], Any]
) -> bool:
    """Compute the cache entry ``path`` unless it is there; True when reused.

    The entry is locked while it is decided and computed: a second process wanting the
    same entry waits, then reuses it.
    """
    with claim(output_files(path, flag), reads, wait=True):
        if path.is_file() and not force:
            return True
        compute()
        return False


def input_writes(plan: Plan, cache: Path) -> list[Write]:
    """The cache entries of a plan's features and text (and their summaries)."""
    return [
        *output_files(plan.features_path(cache), "--cache features"),
        *output_files(plan.text_path(cache), "--cache text")[:2],
    ]


@dataclass
class Inputs:
    """A run's features and text files in the cache, whether each was reused, and the
    seconds of the stages that made them (``extract``, ``text``)."""

    features: Path
    text: Path
    features_reused: bool
    text_reused: bool
    seconds: dict[str, float]
    backbone_loaded: bool


def cached_inputs(
    dataset: str,
    plan: Plan,
    cache: Path,
    *,
    backbone: BackboneSpec,
    settings: ExtractSettings,
    device: str = "cpu",
    batch_size: int = 8,
    forward_batch: int = 256,
    workers: int = 2,
    allow_missing: bool = False,
    progress: Progress = False,
    backend: RayBackend | None = None,
    force: bool = False,
    tf32: bool = False,
    loaded: Loaded | None = None,
) -> Inputs:
    """Extract the features and encode the text of ``plan`` into ``cache``, or reuse them.

    The backbone is loaded only when one of them is computed. Arguments as :func:`run`'s.
    """
    features, text = plan.features_path(cache), plan.text_path(cache)
    with claim(input_writes(plan, cache), plan.reads):
        lazy = _LazyBackbone(backbone, "cpu" if backend is not None else device, device, loaded)
        split = plan.split

        def extract() -> None:
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
                progress=within(progress, "extract"),
                backend=backend,
                reads=plan.reads,
                tf32=tf32,
            )

        def encode_text() -> None:
            build_text_features(
                split.class_names,
                plan.descriptions,
                plan.preset.templates,
                plan.preset.pre,
                lazy.get(),
                text,
                allow_missing=allow_missing,
                metadata={"dataset": dataset},
                reads=plan.reads,
                progress=within(progress, "text"),
                tf32=tf32,
                peers=plan.preset.name,
            )

        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        feat_hit = cached(features, "--cache features", plan.reads, force, extract)
        seconds["extract"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        text_hit = cached(text, "--cache text", plan.reads, force, encode_text)
        seconds["text"] = time.perf_counter() - t0
    return Inputs(features, text, feat_hit, text_hit, seconds, lazy.loaded is not None)


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
    progress: Progress = False,
    backend: RayBackend | None = None,
    force: bool = False,
    plan: Plan | None = None,
    tf32: bool = False,
    profile: bool = False,
    loaded: Loaded | None = None,
) -> dict[str, Any]:
    """Chain the three stages; returns the adaptation summary with a ``cache`` section.

    ``adapt_views`` adapts with only the first V' of the extracted views (view sweeps reuse
    one extraction). With ``backend``, extraction and adaptation run on Ray workers (on
    ``device``), the text stage on this process's CPU; the cached files are the same.
    ``force`` recomputes the cached features and text. ``plan``: the result of
    :func:`plan_run` with the same arguments, when the caller already checked them.
    ``tf32`` and ``profile``: see :func:`ratta.adapt.adapt`. ``loaded`` keeps the model
    and the database loaded for the next call (eval and sweep cells).
    """
    if backend is None:
        device = str(resolve_device(device))
    spec = backbone or BackboneSpec()
    settings = settings or ExtractSettings()
    if plan is None:
        plan = plan_run(
            dataset,
            data_root,
            db,
            spec=spec,
            settings=settings,
            descriptions=descriptions,
            preset=preset,
            class_names_file=class_names_file,
            allow_missing=allow_missing,
            config=config,
            device=device,
            on_ray=backend is not None,
            tf32=tf32,
        )
    out = Path(out_dir)
    root = Path(cache) if cache else cache_dir()
    features, text = plan.features_path(root), plan.text_path(root)
    writes = [
        Write(out, "--out", "folder"),
        *output_files(out / "predictions.safetensors", "--out predictions"),
        *(Write(out / name, "--out results") for name in RESULT_FILES),
        *input_writes(plan, root),
    ]
    with claim(writes, plan.reads):
        started = time.perf_counter()
        previous = _previous(out)
        inputs = cached_inputs(
            dataset,
            plan,
            root,
            backbone=spec,
            settings=settings,
            device=device,
            batch_size=batch_size,
            forward_batch=forward_batch,
            workers=workers,
            allow_missing=allow_missing,
            progress=progress,
            backend=backend,
            force=force,
            tf32=tf32,
            loaded=loaded,
        )
        stages = dict(inputs.seconds)
        feat_hit, text_hit = inputs.features_reused, inputs.text_reused
        if plan.no_candidates:
            warnings.warn(plan.no_candidates, RattaRunWarning, stacklevel=2)
        t0 = time.perf_counter()
        summary = adapt(
            features,
            text,
            db,
            out / "predictions.safetensors",
            plan.config,
            batch_size=adapt_batch_size,
            device=device,
            dtype=dtype,
            views=adapt_views,
            progress=within(progress, "adapt"),
            backend=backend,
            tf32=tf32,
            profile=profile,
            databases=loaded.databases if loaded is not None else None,
        )
        stages["adapt"] = time.perf_counter() - t0
        extraction = json.loads(Path(f"{features}.json").read_text())
        add_skipped(summary, extraction, len(plan.split), f"{features}.json")
        summary["dataset"] = dataset
        summary["identity"] = {
            "features": plan.features,
            "text": plan.text,
            "database": plan.database,
        }
        summary["cache"] = {
            "features": str(features),
            "features_reused": feat_hit,
            "features_reason": reason(feat_hit, force, previous.get("features"), plan.features),
            "text": str(text),
            "text_reused": text_hit,
            "text_reason": reason(text_hit, force, previous.get("text"), plan.text),
            "backbone_loaded": inputs.backbone_loaded,
        }
        if plan.no_candidates:
            summary["warnings"] = [plan.no_candidates]
        summary["stage_seconds"] = {k: round(v, 3) for k, v in stages.items()}
        summary["run_seconds"] = round(time.perf_counter() - started, 3)
        write_json(out / "results.json", summary)
        table = format_results(summary)
        write_text_atomic(out / "results.md", f"# {dataset}\n\n```\n{table}\n```\n")
        return summary


def add_skipped(
    summary: dict[str, Any], extraction: dict[str, Any], total: int, where: str
) -> None:
    """Record the unreadable images of the split, and the accuracy over the full split.

    ``metrics`` are over the encoded images; ``metrics_full_split`` counts every skipped
    image as an error (top-k x encoded / total). A warning names the count.
    """
    skipped = int(extraction.get("skipped", 0))
    summary["skipped"] = skipped
    summary["skipped_images"] = extraction.get("skipped_images", [])[:20]
    summary["split_images"] = total
    if not skipped:
        return
    warnings.warn(
        f"{skipped} of {total} test images could not be read and were skipped (listed in "
        f"{where}); accuracy over the full split counts them as errors",
        RattaRunWarning,
        stacklevel=2,
    )
    encoded = total - skipped
    if "metrics" in summary:
        summary["metrics_full_split"] = {
            name: {k: v * encoded / total for k, v in m.items()}
            for name, m in summary["metrics"].items()
        }
