"""``ratta eval`` and ``ratta sweep``: RA-TTA, its baselines and its peers over datasets and seeds.

Every method is computed from the same cached features of a (dataset, seed) cell:
zero-shot CLIP with one template, the hand-template ensemble, the CuPL classifier (p0),
the retrieval-only prediction (p_ret), RA-TTA (p), and the training-free peers ZERO, MTA,
TDA, BoostAdapter and DMN-ZS (:mod:`ratta.peer_stage`), each on its paper's classifier and
on the CuPL classifier, the online ones over several streams. A cell's per-image outputs
stay in ``DIR/cells/<dataset>/seed-<s>/`` (``predictions.safetensors`` from adapt,
``baselines.safetensors``, ``peers.safetensors``), and every number of the reports is
computed from them.

A cell has three parts, each reused while its identity is unchanged: ``baselines`` (the
features and text files), ``adapt`` (those, the database, views and RA-TTA's config) and
``peers`` (those files, the peers' runs and settings, streams, seed); a part whose methods
are not asked for is neither computed nor reported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ratta.backbones import BackboneSpec, backbone_fingerprint
from ratta.config import RATTAConfig
from ratta.devices import resolve_device
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings
from ratta.files import FeatureReader, load_text, save_safetensors, write_json, write_text_atomic
from ratta.guard import Read, Write, claim
from ratta.identity import changes
from ratta.metrics import classification_metrics
from ratta.peer_stage import (
    CLASSIFIERS,
    ONLINE,
    PEER_METHODS,
    PEER_PARAMS,
    PEERS_FILE,
    RUN_METHOD,
    PeerRun,
    PeerSettings,
    check_peer_value,
    peers_identity,
    plan_peers,
    run_peers,
    tensor_key,
)
from ratta.peers.defaults import CACHE_SETTINGS as PEER_SETTINGS
from ratta.presets import PRESETS
from ratta.progress import Progress, label, within
from ratta.provenance import stamp
from ratta.published import NAMES as PUBLISHED_NAMES
from ratta.published import (
    SHIFTS,
    TRANSFER,
    Figure,
    published,
    published_average,
    sources_of,
)
from ratta.summary import format_times

if TYPE_CHECKING:
    from ratta.distributed import RayBackend
    from ratta.run import Plan

ALL_DATASETS = TRANSFER + SHIFTS

METHODS = {
    "clip": "CLIP ('a photo of a {}.')",
    "ensemble": "Template ensemble",
    "cupl": "CuPL",
    "retrieval": "Retrieval only",
    "ratta": "RA-TTA",
}
ALL_METHODS = (*METHODS, *PEER_METHODS)
# The classifier of each of RA-TTA's methods and baselines (the peers run on two)
OWN_CLASSIFIER = {
    "clip": "single_template",
    "ensemble": "template_ensemble",
    "cupl": "cupl",
    "retrieval": "cupl",
    "ratta": "cupl",
}
ADAPTED = ("retrieval", "ratta")  # the methods that need adaptation, and a database
# Bumped when a cell's identity rules change (2: content identities of every input; 3: the
# parts baselines, adapt and peers).
CELL_FORMAT = 3
REPORT_FILES = ("results.json", "results.csv", "results.md", "plots/gain_over_cupl.png")
# What each part of a cell depends on: the keys of the cell identity.
PARTS: dict[str, tuple[str, ...]] = {
    "baselines": ("format", "dataset", "seed", "features", "text"),
    "adapt": ("format", "dataset", "seed", "features", "text", "database", "views", "config"),
    "peers": ("format", "dataset", "seed", "features", "text", "peers"),
}
PART_FILES = {
    "baselines": ("baselines.safetensors",),
    "adapt": ("predictions.safetensors", "predictions.safetensors.json"),
    "peers": (PEERS_FILE,),
}


def database_for(dataset: str, db_root: str | os.PathLike[str]) -> Path:
    """The database of ``dataset`` under ``db_root``: ``<name>.npy`` or a ``<name>/`` folder.

    ImageNet, -V2 and -Sketch share ImageNet's database, as in the paper.
    """
    name = PRESETS[dataset].database if dataset in PRESETS else dataset
    root = Path(db_root)
    for candidate in (root / f"{name}.npy", root / name):
        if candidate.exists():
            return candidate
    raise RattaInputError(f"--db-root {root}: no database for {dataset} ({name}.npy or {name}/)")


def descriptions_for(dataset: str, descriptions: str) -> str:
    """``auto``, or ``CuPL_prompts_<stem>.json`` inside a folder of description files."""
    if descriptions == "auto" or Path(descriptions).is_file():
        return descriptions
    folder = Path(descriptions)
    stem = PRESETS[dataset].cupl_stem if dataset in PRESETS else dataset
    path = folder / f"CuPL_prompts_{stem}.json"
    if not path.is_file():
        raise RattaInputError(f"--descriptions {folder}: no CuPL_prompts_{stem}.json for {dataset}")
    return str(path)


# The baselines' probabilities: softmax(s z_0 W^T) of these classifiers of the text file.
BASELINE_KEYS = {"clip": "single_template", "ensemble": "template_ensemble"}


def baseline_predictions(features: Path, text_file: Path) -> dict[str, torch.Tensor]:
    """Zero-shot probabilities of CLIP's baselines and of the CuPL classifier on the centre
    crops (``clip``, ``ensemble``, ``cupl``), and the ``labels``."""
    text = load_text(text_file)
    missing = [k for k in BASELINE_KEYS.values() if k not in text.baselines]
    if missing:
        raise RattaInputError(f"{text_file}: no baseline classifiers (rebuild it with ratta text)")
    reader = FeatureReader(features)
    x0 = reader.batch(0, reader.num_images, views=0)[:, 0].float()
    labels = reader.labels.clone() if reader.labels is not None else None
    reader.close()
    if labels is None:
        raise RattaInputError(f"{features}: no labels to evaluate against")
    weights = {m: text.baselines[k] for m, k in BASELINE_KEYS.items()} | {"cupl": text.classifier}
    out = {m: torch.softmax(text.logit_scale * x0 @ w.float().T, dim=1) for m, w in weights.items()}
    return out | {"labels": labels}


def _metrics_row(
    dataset: str, seed: int, method: str, probs: torch.Tensor, labels: torch.Tensor, total: int
) -> dict[str, Any]:
    """top1/top5 over the whole split (skipped images count as errors), the rest over the
    encoded images."""
    n = labels.shape[0]
    metrics = classification_metrics(probs, labels)
    return {
        "dataset": dataset,
        "seed": seed,
        "method": method,
        "images": total,
        "encoded": n,
        "skipped": total - n,
        "top1": metrics["top1"] * n / total,
        "top5": metrics["top5"] * n / total,
        "top1_encoded": metrics["top1"],
        "top5_encoded": metrics["top5"],
        "ece": metrics["ece"],
    }


def cell_rows(
    cell: Path, dataset: str, seed: int, methods: Sequence[str] = ALL_METHODS
) -> list[dict[str, Any]]:
    """The report rows of one cell, computed from its per-image output files.

    ``top1``/``top5`` are over the whole split, images that could not be read counting as
    errors; ``top1_encoded``/``top5_encoded`` and ``ece`` over the encoded images. Each row
    names the tensor it was computed from (``probabilities``: ``file:key`` in the cell).
    """
    record = json.loads((cell / "cell.json").read_text())
    total = int(record["split_images"])
    rows = []
    base = load_file(str(cell / "baselines.safetensors"))
    adapted = any(m in ADAPTED for m in methods)
    if adapted:
        pred = load_file(str(cell / "predictions.safetensors"))
        summary = json.loads((cell / "predictions.safetensors.json").read_text())
        n = pred["labels"].shape[0]
        n_cand = (pred["candidates"] >= 0).sum(1).float()
        stage_ms = {k: 1000.0 * v / n for k, v in summary["timings_s"].items() if k != "total"}
    sources = {
        "clip": ("baselines.safetensors", "clip"),
        "ensemble": ("baselines.safetensors", "ensemble"),
        "cupl": ("baselines.safetensors", "cupl"),
        "retrieval": ("predictions.safetensors", "retrieval"),
        "ratta": ("predictions.safetensors", "final"),
    }
    for method in (m for m in METHODS if m in methods):
        file, key = sources[method]
        probs = base[key] if file == "baselines.safetensors" else pred[key]
        row = _metrics_row(dataset, seed, method, probs, base["labels"], total)
        row |= {
            "label": METHODS[method],
            "classifier": OWN_CLASSIFIER[method],
            "stream": None,
            "probabilities": f"{file}:{key}",
        }
        in_ratta = method in ADAPTED
        row["fallback_rate"] = 100.0 * float((n_cand == 0).float().mean()) if in_ratta else None
        row["mean_candidates"] = float(n_cand.mean()) if in_ratta else None
        row["adapt_ms_per_image"] = 1000.0 * summary["timings_s"]["total"] / n if adapted else None
        row["stage_ms_per_image"] = stage_ms if adapted else {}
        row["database"] = summary["counts"]["database"] if adapted else None
        rows.append(row)
    if any(m in PEER_METHODS for m in methods):
        rows += peer_rows(cell / PEERS_FILE, dataset, seed, total)
    return rows


def peer_rows(path: Path, dataset: str, seed: int, total: int) -> list[dict[str, Any]]:
    """The rows of every probability tensor of a ``peers.safetensors``: one per run,
    classifier and stream (``stream`` None for the episodic runs)."""
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["ratta_peers"])
        labels = f.get_tensor("labels")
        gammas = f.get_tensor("dmn_zs_oracle/gamma") if "dmn_zs_oracle" in info["runs"] else None
        rows = []
        for classifier_index, classifier in enumerate(CLASSIFIERS):
            for key, run in info["runs"].items():
                online = run["method"] in ONLINE
                for stream in range(info["streams"]) if online else [None]:
                    name = tensor_key(key, classifier, stream)
                    row = _metrics_row(dataset, seed, key, f.get_tensor(name), labels, total)
                    config = dict(run["config"])
                    if gammas is not None and key == "dmn_zs_oracle" and stream is not None:
                        config["gamma"] = float(gammas[classifier_index, stream])
                    row |= {
                        "label": run["label"],
                        "classifier": classifier,
                        "stream": stream,
                        "streams": info["stream_kind"] if online else None,
                        "inputs": run["inputs"],
                        "official_inputs": run["official_inputs"],
                        "peer_settings": "official"
                        if info["published_settings"]
                        else "ImageNet's (none published)",
                        "config": config,
                        "probabilities": f"{PEERS_FILE}:{name}",
                        "fallback_rate": None,
                        "mean_candidates": None,
                        "adapt_ms_per_image": None,
                        "stage_ms_per_image": {},
                        "database": None,
                    }
                    rows.append(row)
    return rows


@dataclass
class EvalSettings:
    """What defines every cell (besides dataset and seed); part of its identity.

    ``methods``: those computed and reported (:data:`ALL_METHODS`); ``streams``,
    ``stream_correlation`` and ``dmn_oracle``: the online peers' (:class:`ratta.peer_stage.
    PeerSettings`).
    """

    views: int = 100
    descriptions: str = "auto"
    k_d: int | None = None
    k_s: int | None = None
    quantile: float | None = None
    min_desc: int | None = None
    methods: tuple[str, ...] = ALL_METHODS
    streams: int = 3
    stream_correlation: float | None = None
    dmn_oracle: bool = False

    def config(self, dataset: str) -> RATTAConfig:
        base = RATTAConfig(quantile=PRESETS[dataset].quantile if dataset in PRESETS else 0.75)
        overrides = {
            k: v
            for k, v in (
                ("k_d", self.k_d),
                ("k_s", self.k_s),
                ("quantile", self.quantile),
                ("min_desc", self.min_desc),
            )
            if v is not None
        }
        return replace(base, **overrides)

    def peers(self) -> PeerSettings:
        """The peers' settings, checked (one line for a bad value)."""
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise RattaInputError(
                f"--methods: unknown {', '.join(unknown)} (known: {', '.join(ALL_METHODS)})"
            )
        distinct(self.methods, "--methods")
        settings = PeerSettings(
            methods=tuple(m for m in self.methods if m in PEER_METHODS),
            streams=self.streams,
            correlation=self.stream_correlation,
            dmn_oracle=self.dmn_oracle,
        )
        settings.check_views(self.views)
        return settings

    @property
    def adapted(self) -> bool:
        return any(m in ADAPTED for m in self.methods)


def distinct(values: Sequence[Any], flag: str) -> list[Any]:
    """``values`` in order; one given twice is refused (it would be averaged twice)."""
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise RattaInputError(f"{flag}: {v} is given twice")
        seen.add(v)
    return list(values)


@dataclass
class _Cell:
    """One (dataset, seed) cell: its plan, peer runs and identity."""

    dataset: str
    seed: int
    plan: Plan
    runs: list[PeerRun]
    identity: dict[str, Any]

    def part(self, name: str) -> dict[str, Any]:
        return {k: self.identity[k] for k in PARTS[name]}


def _plan_cell(
    dataset: str,
    seed: int,
    settings: EvalSettings,
    peers: PeerSettings,
    db_root: str | os.PathLike[str] | None,
    plan: Callable[..., Plan],
) -> _Cell:
    p = plan(
        dataset,
        database_for(dataset, db_root) if settings.adapted and db_root is not None else None,
        ExtractSettings(views=settings.views, seed=seed),
        descriptions_for(dataset, settings.descriptions),
        settings.config(dataset),
    )
    runs = plan_peers(dataset, p.preset.name, settings.views, peers) if peers.methods else []
    identity = {
        "format": CELL_FORMAT,
        "dataset": dataset,
        "seed": seed,
        "features": p.features,
        "text": p.text,
        "database": p.database,
        "views": settings.views,
        "config": asdict(p.config) if settings.adapted else None,
        "peers": peers_identity(dataset, runs, peers, seed) if runs else None,
    }
    return _Cell(dataset, seed, p, runs, identity)


def _parts_to_compute(
    cell: _Cell, folder: Path, settings: EvalSettings, force: bool
) -> tuple[dict[str, str], dict[str, Any]]:
    """{part: why it is computed} of the parts asked for whose stored identity differs (or
    whose files are gone), and the parts stored before."""
    try:
        stored = json.loads((folder / "cell.json").read_text())["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    wanted = ["baselines"]
    wanted += ["adapt"] if settings.adapted else []
    wanted += ["peers"] if cell.runs else []
    todo = {}
    for part in wanted:
        new = json.loads(json.dumps(cell.part(part)))
        old = (stored.get(part) or {}).get("identity")
        present = all((folder / f).is_file() for f in PART_FILES[part])
        if force:
            todo[part] = "computed: --force"
        elif old != new or not present:
            changed = changes(old, new) if isinstance(old, dict) else []
            if not old:
                todo[part] = "computed: not done before"
            elif not changed:
                todo[part] = "computed: not done before (it was removed)"
            else:
                more = " ..." if len(changed) > 6 else ""
                todo[part] = "computed: changed " + ", ".join(changed[:6]) + more
    return todo, stored


def evaluate(
    datasets: Sequence[str],
    data_root: str | os.PathLike[str],
    db_root: str | os.PathLike[str] | None,
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    backbone: BackboneSpec | None = None,
    settings: EvalSettings | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    workers: int = 2,
    progress: Progress = False,
    log: Any = None,
    backend: RayBackend | None = None,
    force: bool = False,
    tf32: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) every (dataset, seed) cell and write the reports into ``out_dir``.

    Every cell is planned before any of them runs: a dataset whose inputs fail the checks
    (missing database, descriptions that do not cover its classes, a dimension mismatch)
    is reported at once and the others go on. Each part of a finished cell (baselines,
    adapt, peers) is reused when its identity (the content identities of its features, text
    and database, its config and views, the peers' runs, streams and settings) is
    unchanged, else recomputed with the reason recorded: a change of the peers' settings
    recomputes the peers only, one of RA-TTA's config its adaptation only; ``force``
    recomputes every part. ``db_root`` is needed only when ``retrieval`` or ``ratta`` are
    among the methods. Returns the JSON report. ``backend``: each cell's extraction and
    adaptation on Ray workers (see ``run``). The model and each database are loaded once per
    call, not once per cell; ``tf32`` and ``profile``: see :func:`ratta.adapt.adapt`.
    """
    from ratta.run import Loaded, cached_inputs, plan_run, run
    from ratta.text import cache_dir

    spec = backbone or BackboneSpec()
    settings = settings or EvalSettings()
    unknown = [d for d in datasets if d not in ALL_DATASETS]
    if unknown:
        raise RattaInputError(
            f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(ALL_DATASETS)}, all)"
        )
    datasets = distinct(datasets, "--datasets")
    seeds = distinct(seeds, "--seeds")
    peers = settings.peers()
    if settings.adapted and db_root is None:
        raise RattaInputError(
            "--db-root is needed for retrieval and ratta (or leave them out of --methods)"
        )
    if backend is None:
        device = str(resolve_device(device))  # once, not as a failure of every cell
    out = Path(out_dir)
    root = Path(cache) if cache else cache_dir()
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    bb_fp = backbone_fingerprint(spec, device, tf32)
    loaded = Loaded()
    failures: list[dict[str, Any]] = []

    def failed(dataset: str, seed: int, exc: BaseException) -> None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        failures.append({"dataset": dataset, "seed": seed, "error": message})
        say(f"{dataset} seed {seed}: FAILED: {message}")

    def plan(dataset: str, db: Path | None, extract: ExtractSettings, desc: str, cfg: Any) -> Plan:
        return plan_run(
            dataset,
            data_root,
            db,
            spec=spec,
            settings=extract,
            descriptions=desc,
            config=cfg,
            device=device,
            on_ray=backend is not None,
            tf32=tf32,
        )

    cells: list[_Cell] = []
    for dataset in datasets:
        for seed in seeds:
            try:
                cells.append(_plan_cell(dataset, seed, settings, peers, db_root, plan))
            except RattaInputError as exc:
                failed(dataset, seed, exc)
    stages = {"check": time.perf_counter() - started}
    writes = [Write(out, "--out", "folder")]
    writes += [Write(out / name, "--out report") for name in REPORT_FILES]
    writes += [
        Write(out / "cells" / c.dataset / f"seed-{c.seed}", "--out cell", "folder") for c in cells
    ]
    reads = [
        *Read.of(data_root, "--data-root"),
        *(Read.of(db_root, "--db-root") if db_root is not None else []),
        *(
            Read.of(settings.descriptions, "--descriptions")
            if settings.descriptions != "auto"
            else []
        ),
        *spec.reads(),
    ]
    rows: list[dict[str, Any]] = []
    computed = reused = 0
    with claim(writes, reads):
        for c in cells:
            dataset, seed, p = c.dataset, c.seed, c.plan
            folder = out / "cells" / dataset / f"seed-{seed}"
            bar = f"{label(progress, 'eval')} {dataset} seed {seed}" if progress else False
            try:
                todo, stored = _parts_to_compute(c, folder, settings, force)
                if not todo:
                    reused += 1
                    say(f"{dataset} seed {seed}: done before, reused")
                    rows.extend(cell_rows(folder, dataset, seed, settings.methods))
                    continue
                cell_started = time.perf_counter()
                extract = ExtractSettings(views=settings.views, seed=seed)
                parts = dict(stored)
                cell_stages: dict[str, float] = {}
                if "adapt" in todo and db_root is not None:
                    summary = run(
                        dataset,
                        data_root,
                        database_for(dataset, db_root),
                        folder,
                        backbone=spec,
                        settings=extract,
                        cache=cache,
                        device=device,
                        workers=workers,
                        progress=bar,
                        backend=backend,
                        force=force,
                        plan=p,
                        tf32=tf32,
                        profile=profile,
                        loaded=loaded,
                    )
                    cell_stages |= summary["stage_seconds"]
                    parts["adapt"] = {
                        "identity": c.part("adapt"),
                        "reason": todo["adapt"],
                        "summary": summary,
                    }
                else:
                    inputs = cached_inputs(
                        dataset,
                        p,
                        root,
                        backbone=spec,
                        settings=extract,
                        device=device,
                        workers=workers,
                        progress=bar,
                        backend=backend,
                        force=force,
                        tf32=tf32,
                        loaded=loaded,
                    )
                    cell_stages |= inputs.seconds
                features, text = p.features_path(root), p.text_path(root)
                if "baselines" in todo:
                    t0 = time.perf_counter()
                    save_safetensors(
                        folder / "baselines.safetensors", baseline_predictions(features, text)
                    )
                    cell_stages["baselines"] = time.perf_counter() - t0
                    parts["baselines"] = {
                        "identity": c.part("baselines"),
                        "reason": todo["baselines"],
                    }
                if "peers" in todo:
                    t0 = time.perf_counter()
                    peer_summary = run_peers(
                        dataset,
                        features,
                        text,
                        folder / PEERS_FILE,
                        c.runs,
                        peers,
                        seed,
                        progress=within(bar, "peers"),
                    )
                    cell_stages["peers"] = time.perf_counter() - t0
                    parts["peers"] = {
                        "identity": c.part("peers"),
                        "reason": todo["peers"],
                        "summary": peer_summary,
                    }
                why = "; ".join(dict.fromkeys(todo.values()))
                for stage, secs in cell_stages.items():
                    stages[stage] = stages.get(stage, 0.0) + secs
                seconds = time.perf_counter() - cell_started
                write_json(
                    folder / "cell.json",
                    {
                        "identity": c.identity,
                        "reason": why,
                        "computed": sorted(todo),
                        "parts": parts,
                        "split_images": len(p.split),
                        "seconds": seconds,
                    },
                )
                computed += 1
                parts_done = ", ".join(sorted(todo))
                times = format_times(seconds, cell_stages)
                say(f"{dataset} seed {seed} ({parts_done}): {why}; {times}")
                rows.extend(cell_rows(folder, dataset, seed, settings.methods))
            except (RattaInputError, OSError, RuntimeError, ValueError) as exc:
                failed(dataset, seed, exc)
        report = {
            **stamp(),
            "backbone": bb_fp,
            "settings": asdict(settings),
            "methods": list(settings.methods),
            "datasets": list(datasets),
            "seeds": list(seeds),
            "cells_computed": computed,
            "cells_reused": reused,
            "skipped_images": sum({(r["dataset"], r["seed"]): r["skipped"] for r in rows}.values()),
            "failures": failures,
            "rows": rows,
        }
        write_reports(out, report, started, stages)
    return report


# --------------------------------------------------------------------------- reports

CSV_FIELDS = (
    "dataset",
    "seed",
    "method",
    "label",
    "classifier",
    "stream",
    "images",
    "encoded",
    "skipped",
    "top1",
    "top5",
    "top1_encoded",
    "top5_encoded",
    "ece",
    "fallback_rate",
    "mean_candidates",
    "adapt_ms_per_image",
    "database",
    "inputs",
    "peer_settings",
    "probabilities",
)


def write_reports(
    out: Path, report: dict[str, Any], started: float, stages: dict[str, float]
) -> None:
    """results.csv (tidy), results.md (paper layout), plots/, then results.json, which
    records the times: ``seconds`` since ``started`` (a ``time.perf_counter()``) and
    ``stage_seconds``, the ``stages`` summed over the cells computed plus ``reports``."""
    t0 = time.perf_counter()
    buf = io.StringIO()
    adapt_stages = sorted({k for r in report["rows"] for k in r["stage_ms_per_image"]})
    writer = csv.writer(buf)
    writer.writerow([*CSV_FIELDS, *(f"ms_{s}" for s in adapt_stages)])
    for r in report["rows"]:
        writer.writerow(
            [_csv_value(r.get(f)) for f in CSV_FIELDS]
            + [_csv_value(r["stage_ms_per_image"].get(s)) for s in adapt_stages]
        )
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.md", markdown_report(report))
    if report["rows"]:
        from ratta.plots import plot_gain

        plot_gain(aggregate(report["rows"]), out / "plots" / "gain_over_cupl.png")
    stages = {**stages, "reports": time.perf_counter() - t0}
    report["stage_seconds"] = {k: round(v, 3) for k, v in stages.items()}
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out / "results.json", report)


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


Key = Callable[[dict[str, Any]], Any]


def _by_method(row: dict[str, Any]) -> Any:
    return row["method"]


def _by_run(row: dict[str, Any]) -> Any:
    return row["method"], row.get("classifier")


def aggregate(rows: Sequence[dict[str, Any]], metric: str = "top1", key: Key = _by_method) -> dict:
    """{dataset: {key: (mean, std, count)}} over the seeds (and streams) of each key."""
    values: dict[str, dict[Any, list[float]]] = {}
    for r in rows:
        values.setdefault(r["dataset"], {}).setdefault(key(r), []).append(r[metric])
    return {
        d: {
            m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for m, v in per.items()
        }
        for d, per in values.items()
    }


def _fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


# The published figures shown beside ours, and the figure Δ is taken against.
PUBLISHED_COLUMNS = ("cupl", "ratta")
DERIVED_MARK = "†"
UNPUBLISHED_MARK = "‡"  # a dataset without published settings for the peers


def markdown_report(report: dict[str, Any]) -> str:
    """results.md: the paper's layout, our methods beside the published figures, then the
    table "RA-TTA and training-free peers" when peers were run.

    A published figure stands beside ours only where it covers the same datasets: per
    dataset, and for an average only over exactly the datasets averaged here
    (:func:`ratta.published.published_average`); the sources are listed below the tables.
    """
    rows = report["rows"]
    agg = aggregate(rows)
    seeds = ", ".join(str(s) for s in report["seeds"])
    fp = report["backbone"]
    backbone = f"{fp.get('model')} / {fp.get('pretrained') or 'local checkpoint'}"
    lines = [
        "# RA-TTA evaluation",
        "",
        f"Top-1 accuracy (%), mean ± std over seeds {seeds}; backbone `{backbone}`. "
        "Published: ViT-B/16 figures (sources below), shown only over the same datasets; "
        "Δ = ours − published (RA-TTA).",
        "",
    ]
    if (fp.get("model"), fp.get("pretrained")) != ("ViT-B-16", "openai"):
        lines += [
            "The published figures are for ViT-B/16 with OpenAI's weights, not this "
            "backbone: compare them with care.",
            "",
        ]
    shown: list[Figure | None] = []
    derived = False
    ours = [m for m in METHODS if any(r["method"] == m for r in rows)]
    columns = [m for m in PUBLISHED_COLUMNS if m in ours]
    for title, names in (("Transfer datasets", TRANSFER), ("ImageNet distribution shifts", SHIFTS)):
        present = [d for d in names if d in agg and any(m in agg[d] for m in ours)]
        if not present:
            continue
        pub_names = [f"published {PUBLISHED_NAMES[m]}" for m in columns]
        delta = ["Δ"] if "ratta" in columns else []
        header = [METHODS[m] for m in ours] + pub_names + delta
        lines += [
            f"## {title}",
            "",
            "| dataset | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header),
        ]
        for d in present:
            figures = {m: published(m, d) for m in columns}
            shown += figures.values()
            lines.append(_row(d, ours, agg[d], figures))
        means = {m: _average(rows, present, m) for m in ours}
        figures = {m: published_average(m, present) for m in columns}
        shown += figures.values()
        derived = derived or any(f is not None and f.derived for f in figures.values())
        lines += [_row(f"Average ({len(present)} of {len(names)})", ours, means, figures), ""]
    if any(r["method"] in RUN_METHOD for r in rows):
        section, figures_shown = _peers_section(report)
        lines += section
        shown += figures_shown
        derived = derived or any(f is not None and f.derived for f in figures_shown)
    sources = sources_of(shown)
    if sources:
        lines += ["Published figures:", ""]
        lines += [f"- {source.describe()}" for source in sources]
        if derived:
            lines.append(
                f"- {DERIVED_MARK} the mean of the published per-dataset figures of the "
                "datasets averaged here (no source states this average)"
            )
        lines.append("")
    if report["failures"]:
        lines += ["## Failed cells", ""]
        lines += [f"- {f['dataset']} seed {f['seed']}: {f['error']}" for f in report["failures"]]
        lines.append("")
    return "\n".join(lines)


def _average(
    rows: Sequence[dict[str, Any]], datasets: Sequence[str], method: Any, key: Key = _by_method
) -> tuple[float, float, int] | None:
    """Mean ± std over seeds (and streams) of the average over ``datasets``, per seed and
    stream having them all."""
    per_run: dict[tuple[int, Any], dict[str, float]] = {}
    for r in rows:
        if key(r) == method and r["dataset"] in datasets:
            per_run.setdefault((r["seed"], r.get("stream")), {})[r["dataset"]] = r["top1"]
    averages = [statistics.fmean(v.values()) for v in per_run.values() if len(v) == len(datasets)]
    if not averages:
        return None
    std = statistics.stdev(averages) if len(averages) > 1 else 0.0
    return statistics.fmean(averages), std, len(averages)


def _published_cell(figure: Figure | None) -> str:
    if figure is None:
        return "–"
    return f"{figure.top1:.2f}" + (DERIVED_MARK if figure.derived else "")


def _row(name: str, ours: Sequence[str], stats: dict, figures: dict[str, Figure | None]) -> str:
    cells = [_fmt(stats.get(m)) for m in ours]
    pubs = [_published_cell(figures[m]) for m in figures]
    if "ratta" in figures:
        mine, theirs = stats.get("ratta"), figures["ratta"]
        pubs.append(f"{mine[0] - theirs.top1:+.2f}" if mine and theirs else "–")
    return f"| {name} | " + " | ".join([*cells, *pubs]) + " |"


# The rows of the peers' table: per published method, the (method, classifier) of its
# rows, in order, and which of them is like with like to its published figures.
CLASSIFIER_NAMES = {
    "single_template": "single template",
    "template_ensemble": "hand templates",
    "paper": "paper",
    "cupl": "CuPL",
}


def _like(method: str, dataset: str, runs: set[str]) -> tuple[str, str] | None:
    """The (run, classifier) of ours that the published figure of ``method`` on ``dataset``
    measures: its paper's classifier, official query, and for DMN-ZS the oracle gamma."""
    if method == "tda":
        views = PEER_SETTINGS.get(dataset) is not None and PEER_SETTINGS[dataset].query == "views"
        return ("tda_views" if views else "tda", "paper")
    if method == "dmn_zs":
        return ("dmn_zs_oracle", "paper") if "dmn_zs_oracle" in runs else None
    if method in PEER_METHODS:
        return (method, "paper")
    return (
        method,
        {"clip": "single_template", "ensemble": "template_ensemble"}.get(method, "cupl"),
    )


def _peers_section(report: dict[str, Any]) -> tuple[list[str], list[Figure | None]]:
    """The table "RA-TTA and training-free peers": ours on both classifiers, the published
    figures of baselines.md and the difference, with the notes that name every variant."""
    rows = [r for r in report["rows"] if r["method"] != "retrieval"]
    agg = aggregate(rows, key=_by_run)
    runs = {r["method"] for r in rows}
    labels: dict[tuple[str, Any], list[str]] = {}
    for r in rows:
        names = labels.setdefault(_by_run(r), [])
        if r["label"] not in names:
            names.append(r["label"])
    flagged = {r["dataset"] for r in rows if r.get("peer_settings", "official") != "official"}
    settings = report.get("settings") or {}
    streams = settings.get("streams", 3)
    kind = next((r["streams"] for r in rows if r.get("streams")), "shuffled")
    lines = [
        "## RA-TTA and training-free peers",
        "",
        "Top-1 accuracy (%), mean ± std over seeds; for the online peers (TDA, "
        f"BoostAdapter, DMN-ZS) over seeds × {streams} {kind} streams per seed. "
        "Classifier: the method's paper's, or ratta's CuPL classifier. Published: ViT-B/16 "
        "figures (sources below), beside ours only over the same datasets; Δ = ours − "
        "published, for the row that runs what the paper ran (its classifier, query and "
        "gamma).",
        "",
    ]
    shown: list[Figure | None] = []
    for title, names in (("Transfer datasets", TRANSFER), ("ImageNet distribution shifts", SHIFTS)):
        present = [d for d in names if d in agg]
        if not present:
            continue
        avg = f"Average ({len(present)} of {len(names)})"
        heads = [f"{d} {UNPUBLISHED_MARK}" if d in flagged else d for d in present]
        lines += [
            f"### {title}",
            "",
            "| method | classifier | " + " | ".join([*heads, avg]) + " |",
            "|---|---|" + "---:|" * (len(present) + 1),
        ]
        for method in ("clip", "ensemble", "cupl", "ratta", *PEER_METHODS):
            keys = [k for k in labels if RUN_METHOD.get(k[0], k[0]) == method]
            keys = [k for k in keys if any(k in agg[d] for d in present)]
            keys.sort(key=lambda k: list(RUN_METHOD).index(k[0]) if k[0] in RUN_METHOD else 0)
            if not keys:
                continue
            for key in keys:
                cells = [_fmt(agg[d].get(key)) for d in present]
                cells.append(_fmt(_average(rows, present, key, _by_run)))
                name = " / ".join(labels[key])
                lines.append(
                    f"| {name} | {CLASSIFIER_NAMES.get(key[1], key[1])} | "
                    + " | ".join(cells)
                    + " |"
                )
            figures = [published(method, d) for d in present]
            average = published_average(method, present)
            if not any(figures) and average is None:
                continue
            shown += [*figures, average]
            caveats = [s.caveat for f in [*figures, average] if f for s in f.sources if s.caveat]
            flag = f" ({'; '.join(dict.fromkeys(caveats))})" if caveats else ""
            pub_cells = [_published_cell(f) for f in [*figures, average]]
            lines.append(
                f"| {PUBLISHED_NAMES[method]}, published{flag} | | " + " | ".join(pub_cells) + " |"
            )
            likes = [_like(method, d, runs) for d in present]
            deltas = [
                _delta(agg[d].get(like) if like else None, f)
                for d, like, f in zip(present, likes, figures, strict=True)
            ]
            same = likes[0] if likes and all(x == likes[0] for x in likes) else None
            deltas.append(_delta(_average(rows, present, same, _by_run) if same else None, average))
            if any(x != "–" for x in deltas):
                lines.append(f"| {PUBLISHED_NAMES[method]}, Δ | | " + " | ".join(deltas) + " |")
        lines.append("")
    lines += _peer_notes(rows, runs, flagged)
    return lines, shown


def _delta(ours: tuple[float, float, int] | None, figure: Figure | None) -> str:
    return f"{ours[0] - figure.top1:+.2f}" if ours and figure else "–"


PEER_NOTES = {
    "tda": "TDA (z0): the query is the centre crop z_0, as the official code on ImageNet "
    "and the transfer datasets; on ImageNet-A/V2/R/Sketch it is the variant TTA-VLM and "
    "StatA run (the published figures there are TDA (views)'s).",
    "tda_views": "TDA (views): the official query on ImageNet-A/V2/R/Sketch, the mean of "
    "the 6 most confident of z_0 and 63 views, here ratta's views (RandomResizedCrop "
    "0.08-1 + flip) where the official code uses AugMix.",
    "dmn_zs": "DMN-ZS (ratta views): ratta's views where DMN's code uses RandomResizedCrop "
    "0.5-1 (with AugMix on the transfer datasets); gamma = 1, as TTA-VLM runs it; its paper "
    "classifier adds the CuPL sentences of --descriptions where its paper used the "
    "davinci-era CuPL files.",
    "dmn_zs_oracle": "oracle gamma: DMN-ZS with gamma picked per stream among DMN's 13 "
    "values (0.001 to 1000) by top-1 on the test labels, as its paper did: it reads the "
    "labels, so it is not a test-time method; its published figures are such oracles.",
}


def _peer_notes(rows: Sequence[dict[str, Any]], runs: set[str], flagged: set[str]) -> list[str]:
    notes = [
        "Classifiers: paper, the classifier of the method's paper (ZERO, MTA: 'a photo of "
        "a {}.'; TDA, BoostAdapter: TDA's per-dataset templates; DMN-ZS: its templates and "
        "each class's CuPL sentences); CuPL, ratta's CuPL classifier (RA-TTA's zero-shot "
        "start). Every peer runs from the cached features (z_0 and the first N - 1 views).",
    ]
    notes += [PEER_NOTES[k] for k in PEER_NOTES if k in runs]
    fewer = sorted(
        {f"{r['label']}" for r in rows if r.get("inputs") and r["inputs"] < r["official_inputs"]}
    )
    if fewer:
        notes.append(
            "N of M inputs: fewer views were extracted (--views) than the official code "
            f"reads: {', '.join(fewer)}."
        )
    if flagged:
        notes.append(
            f"{UNPUBLISHED_MARK} no published settings for the peers on "
            f"{', '.join(sorted(flagged))}: ImageNet's are used."
        )
    return [*(f"- {n}" for n in notes), ""]


# --------------------------------------------------------------------------- sweeps

SWEEP_PARAMS = ("k_d", "k_s", "quantile", "min_desc", "views")


def sweep_values(param: str, values: Sequence[float], views: int) -> list[float | int]:
    """The values of a sweep, checked before any work: finite, in range, integers where
    the parameter is one, each given once. ``param``: one of :data:`SWEEP_PARAMS` (RA-TTA's)
    or of :data:`ratta.peer_stage.PEER_PARAMS` (a peer's, ``tda.alpha_pos``)."""
    if param not in SWEEP_PARAMS and param not in PEER_PARAMS:
        raise RattaInputError(
            f"--param must be one of {', '.join(SWEEP_PARAMS)} or a peer's "
            f"({', '.join(PEER_PARAMS)}), got '{param}'"
        )
    if not values:
        raise RattaInputError("--values: give at least one value")
    out: list[float | int] = []
    for value in distinct(list(values), "--values"):
        if param in PEER_PARAMS:
            out.append(check_peer_value(param, value, views))
            continue
        if not math.isfinite(value):
            raise RattaInputError(f"--values: {value} is not a finite number")
        if param == "quantile":
            if not 0.0 <= value <= 1.0:
                raise RattaInputError(f"--values: quantile {value} is outside [0, 1]")
            out.append(float(value))
            continue
        if value != int(value):
            raise RattaInputError(f"--values: {param} takes integers, got {value}")
        low, high = (0, views) if param == "views" else (1, None)
        if value < low or (high is not None and value > high):
            bound = f"0..{views} (the views extracted)" if param == "views" else ">= 1"
            raise RattaInputError(f"--values: {param} {int(value)} is outside {bound}")
        out.append(int(value))
    return out


def _value_folder(out: Path, param: str, value: float | int) -> Path:
    digest = hashlib.sha256(f"{param}={value}".encode()).hexdigest()[:8]
    return out / "runs" / f"{param}-{value}-{digest}"


def sweep(
    param: str,
    values: Sequence[float],
    dataset: str,
    data_root: str | os.PathLike[str],
    db: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    backbone: BackboneSpec | None = None,
    views: int = 100,
    seed: int = 0,
    descriptions: str = "auto",
    config: RATTAConfig | None = None,
    peers: PeerSettings | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    workers: int = 2,
    progress: Progress = False,
    backend: RayBackend | None = None,
    force: bool = False,
    tf32: bool = False,
    profile: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy against each value of one hyperparameter, on features extracted once.

    RA-TTA's (:data:`SWEEP_PARAMS`): CuPL, retrieval-only and RA-TTA, adapting once per
    value on the database ``db``; a sweep over ``views`` adapts with the first V' of the
    ``views`` extracted. ``config`` holds the other hyperparameters (default: the dataset's
    preset). A peer's (``tda.alpha_pos``, :data:`ratta.peer_stage.PEER_PARAMS`): that peer
    on both classifiers per value (no database; ``peers``: its streams, correlation and
    oracle; the other settings official). Every value and input is checked before the first
    run; the model and the database are loaded once. Writes sweep_<param>.csv/.json and a
    plot into ``out_dir``, and each value's per-image outputs under ``runs/``.
    """
    checked = sweep_values(param, values, views)
    if param in PEER_PARAMS:
        return _peer_sweep(
            param,
            checked,
            dataset,
            data_root,
            Path(out_dir),
            backbone=backbone or BackboneSpec(),
            extract=ExtractSettings(views=views, seed=seed),
            descriptions=descriptions,
            peers=peers or PeerSettings(),
            cache=cache,
            device=device,
            workers=workers,
            progress=progress,
            backend=backend,
            force=force,
            tf32=tf32,
        )
    if db is None:
        raise RattaInputError(f"--db is needed to sweep RA-TTA's {param}")
    from ratta.plots import plot_sweep
    from ratta.run import Loaded, plan_run, run

    out = Path(out_dir)
    base = config or EvalSettings().config(dataset)
    settings = ExtractSettings(views=views, seed=seed)
    spec = backbone or BackboneSpec()
    plans = [
        plan_run(
            dataset,
            data_root,
            db,
            spec=spec,
            settings=settings,
            descriptions=descriptions_for(dataset, descriptions),
            config=base if param == "views" else replace(base, **{param: value}),
            device=device,
            on_ray=backend is not None,
            tf32=tf32,
        )
        for value in checked
    ]
    names = [f"sweep_{param}.{ext}" for ext in ("json", "csv", "png")]
    writes = [Write(out, "--out", "folder"), *(Write(out / n, "--out report") for n in names)]
    loaded = Loaded()
    results = []
    with claim(writes, plans[0].reads):
        for value, plan in zip(checked, plans, strict=True):
            summary = run(
                dataset,
                data_root,
                db,
                _value_folder(out, param, value),
                backbone=spec,
                settings=settings,
                cache=cache,
                device=device,
                workers=workers,
                adapt_views=int(value) if param == "views" else None,
                progress=f"{label(progress, 'sweep')} {param}={value}" if progress else False,
                backend=backend,
                force=force and not results,  # recompute the shared caches once
                plan=plan,
                tf32=tf32,
                profile=profile,
                loaded=loaded,
            )
            m = summary["metrics"]
            results.append(
                {
                    "param": param,
                    "value": value,
                    "cupl_top1": m["zero_shot"]["top1"],
                    "retrieval_top1": m["retrieval"]["top1"],
                    "ratta_top1": m["ratta"]["top1"],
                    "fallback": summary["counts"]["fallback"],
                    "skipped": summary["skipped"],
                    "features_reused": summary["cache"]["features_reused"],
                }
            )
        config_used = {k: v for k, v in base.to_dict().items() if k != param}
        header = {**stamp(), "dataset": dataset, "seed": seed, "fixed": config_used}
        _write_sweep(out, names, header, results)
        xs = [r["value"] for r in results]
        plot_sweep(
            xs,
            [
                ("RA-TTA", [r["ratta_top1"] for r in results], None, "o-"),
                ("retrieval only", [r["retrieval_top1"] for r in results], None, "s--"),
                ("CuPL (zero-shot)", [r["cupl_top1"] for r in results], None, "k:"),
            ],
            SWEEP_LABELS[param],
            dataset,
            out / names[2],
        )
    return results


SWEEP_LABELS = {
    "k_d": "K_D (top descriptions)",
    "k_s": "K_S (retrieved images per set)",
    "quantile": "q (description-score quantile)",
    "min_desc": "min_desc",
    "views": "V (random views)",
}


def _write_sweep(
    out: Path, names: Sequence[str], header: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    write_json(out / names[0], {**header, "results": results})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for k in results[0] if k != "top1_per_stream"])
    writer.writeheader()
    writer.writerows({k: v for k, v in r.items() if k in writer.fieldnames} for r in results)
    write_text_atomic(out / names[1], buf.getvalue())


def _peer_sweep(
    param: str,
    values: list[float | int],
    dataset: str,
    data_root: str | os.PathLike[str],
    out: Path,
    *,
    backbone: BackboneSpec,
    extract: ExtractSettings,
    descriptions: str,
    peers: PeerSettings,
    cache: str | os.PathLike[str] | None,
    device: str,
    workers: int,
    progress: Progress,
    backend: RayBackend | None,
    force: bool,
    tf32: bool,
) -> list[dict[str, Any]]:
    """A peer's top-1, top-5 and ECE per value of ``param``, on both classifiers (mean and
    std over the streams of an online peer)."""
    from ratta.plots import plot_sweep
    from ratta.run import cached_inputs, plan_run
    from ratta.text import cache_dir

    method = PEER_PARAMS[param].method
    if peers.dmn_oracle and param == "dmn_zs.gamma":
        raise RattaInputError("--dmn-oracle picks gamma itself: it cannot sweep dmn_zs.gamma")
    settings = [replace(peers, methods=(method,), overrides=((param, value),)) for value in values]
    plan = plan_run(
        dataset,
        data_root,
        None,
        spec=backbone,
        settings=extract,
        descriptions=descriptions_for(dataset, descriptions),
        config=None,
        device=device,
        on_ray=backend is not None,
        tf32=tf32,
    )
    runs = [plan_peers(dataset, plan.preset.name, extract.views, s) for s in settings]
    names = [f"sweep_{param}.{ext}" for ext in ("json", "csv", "png")]
    folders = [_value_folder(out, param, v) for v in values]
    writes = [Write(out, "--out", "folder"), *(Write(out / n, "--out report") for n in names)]
    writes += [Write(f, "--out run", "folder") for f in folders]
    results: list[dict[str, Any]] = []
    with claim(writes, plan.reads):
        inputs = cached_inputs(
            dataset,
            plan,
            Path(cache) if cache else cache_dir(),
            backbone=backbone,
            settings=extract,
            device=device,
            workers=workers,
            progress=within(progress, "sweep") if progress else False,
            backend=backend,
            force=force,
            tf32=tf32,
        )
        for value, s, r, folder in zip(values, settings, runs, folders, strict=True):
            bar = f"{label(progress, 'sweep')} {param}={value}: peers" if progress else False
            run_peers(
                dataset,
                inputs.features,
                inputs.text,
                folder / PEERS_FILE,
                r,
                s,
                extract.seed,
                progress=bar,
            )
            rows = peer_rows(folder / PEERS_FILE, dataset, extract.seed, len(plan.split))
            for key, group in _groups(rows).items():
                top1 = [g["top1"] for g in group]
                online = group[0]["stream"] is not None
                results.append(
                    {
                        "param": param,
                        "value": value,
                        "method": key[0],
                        "label": group[0]["label"],
                        "classifier": key[1],
                        "top1": statistics.fmean(top1),
                        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                        "top5": statistics.fmean(g["top5"] for g in group),
                        "ece": statistics.fmean(g["ece"] for g in group),
                        "streams": len(group) if online else None,
                        "features_reused": inputs.features_reused,
                        "top1_per_stream": top1 if online else None,
                    }
                )
        header = {
            **stamp(),
            "dataset": dataset,
            "seed": extract.seed,
            "fixed": {k: v.describe() for k, v in ((x.key, x) for x in runs[0])},
            "streams": peers.streams,
            "stream_correlation": peers.correlation,
        }
        _write_sweep(out, names, header, results)
        series = []
        for key in dict.fromkeys((r["method"], r["classifier"]) for r in results):
            mine = [r for r in results if (r["method"], r["classifier"]) == key]
            name = f"{mine[0]['label']}, {CLASSIFIER_NAMES[key[1]]} classifier"
            series.append((name, [r["top1"] for r in mine], [r["top1_std"] for r in mine], None))
        plot_sweep(values, series, param, dataset, out / names[2])
    return results


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (run, classifier), in order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["classifier"]), []).append(r)
    return groups
