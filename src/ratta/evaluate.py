"""``ratta eval`` and ``ratta sweep``: RA-TTA and its baselines over datasets and seeds.

Every method is computed from the same cached features of a (dataset, seed) cell:
zero-shot CLIP with one template, the hand-template ensemble, the CuPL classifier (p0),
the retrieval-only prediction (p_ret) and RA-TTA (p). A cell's per-image outputs stay in
``DIR/cells/<dataset>/seed-<s>/`` (``predictions.safetensors`` from adapt, ``baselines
.safetensors``), and every number of the reports is computed from them.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from ratta.backbones import BackboneSpec, backbone_fingerprint
from ratta.config import RATTAConfig
from ratta.devices import resolve_device
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings
from ratta.files import FeatureReader, load_text, save_safetensors, write_json, write_text_atomic
from ratta.guard import Read, Write, claim
from ratta.metrics import classification_metrics
from ratta.presets import PRESETS
from ratta.progress import Progress, label
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

ALL_DATASETS = TRANSFER + SHIFTS

METHODS = {
    "clip": "CLIP ('a photo of a {}.')",
    "ensemble": "Template ensemble",
    "cupl": "CuPL",
    "retrieval": "Retrieval only",
    "ratta": "RA-TTA",
}
# Bumped when a cell's identity rules change (2: content identities of every input).
CELL_FORMAT = 2
REPORT_FILES = ("results.json", "results.csv", "results.md", "plots/gain_over_cupl.png")


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


def _softmax_predictions(features: Path, text_file: Path) -> dict[str, torch.Tensor]:
    """Zero-shot probabilities of the baseline classifiers on the center crops."""
    text = load_text(text_file)
    if not text.baselines:
        raise RattaInputError(f"{text_file}: no baseline classifiers (rebuild it with ratta text)")
    reader = FeatureReader(features)
    x0 = reader.batch(0, reader.num_images, views=0)[:, 0].float()
    reader.close()
    return {
        name: torch.softmax(text.logit_scale * x0 @ w.float().T, dim=1)
        for name, w in text.baselines.items()
    }


def cell_rows(cell: Path, dataset: str, seed: int) -> list[dict[str, Any]]:
    """The report rows of one cell, computed from its per-image output files.

    ``top1``/``top5`` are over the whole split, images that could not be read counting as
    errors; ``top1_encoded``/``top5_encoded`` and ``ece`` over the encoded images.
    """
    pred = load_file(str(cell / "predictions.safetensors"))
    base = load_file(str(cell / "baselines.safetensors"))
    summary = json.loads((cell / "predictions.safetensors.json").read_text())
    results = json.loads((cell / "results.json").read_text())
    labels = pred["labels"]
    n = labels.shape[0]
    total = int(results.get("split_images", n))
    n_cand = (pred["candidates"] >= 0).sum(1).float()
    stage_ms = {k: 1000.0 * v / n for k, v in summary["timings_s"].items() if k != "total"}
    probs = {
        "clip": base["single_template"],
        "ensemble": base["template_ensemble"],
        "cupl": pred["zero_shot"],
        "retrieval": pred["retrieval"],
        "ratta": pred["final"],
    }
    rows = []
    for method, p in probs.items():
        metrics = classification_metrics(p, labels)
        row: dict[str, Any] = {
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
        adaptive = method in ("retrieval", "ratta")
        row["fallback_rate"] = 100.0 * float((n_cand == 0).float().mean()) if adaptive else None
        row["mean_candidates"] = float(n_cand.mean()) if adaptive else None
        row["adapt_ms_per_image"] = 1000.0 * summary["timings_s"]["total"] / n
        row["stage_ms_per_image"] = stage_ms
        row["database"] = summary["counts"]["database"]
        rows.append(row)
    return rows


@dataclass
class EvalSettings:
    """What defines every cell (besides dataset and seed); part of its identity."""

    views: int = 100
    descriptions: str = "auto"
    k_d: int | None = None
    k_s: int | None = None
    quantile: float | None = None
    min_desc: int | None = None

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


def distinct(values: Sequence[Any], flag: str) -> list[Any]:
    """``values`` in order; one given twice is refused (it would be averaged twice)."""
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise RattaInputError(f"{flag}: {v} is given twice")
        seen.add(v)
    return list(values)


def evaluate(
    datasets: Sequence[str],
    data_root: str | os.PathLike[str],
    db_root: str | os.PathLike[str],
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
    is reported at once and the others go on. A finished cell is reused when its identity
    (the content identities of its features, text and database, its config and views) is
    unchanged, else recomputed with the reason recorded; ``force`` recomputes every cell.
    Returns the JSON report. ``backend``: each cell's extraction and adaptation on Ray
    workers (see ``run``). The model and each database are loaded once per call, not once
    per cell; ``tf32`` and ``profile``: see :func:`ratta.adapt.adapt`.
    """
    from ratta.run import Loaded, plan_run, reason, run

    spec = backbone or BackboneSpec()
    settings = settings or EvalSettings()
    unknown = [d for d in datasets if d not in ALL_DATASETS]
    if unknown:
        raise RattaInputError(
            f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(ALL_DATASETS)}, all)"
        )
    datasets = distinct(datasets, "--datasets")
    seeds = distinct(seeds, "--seeds")
    if backend is None:
        device = str(resolve_device(device))  # once, not as a failure of every cell
    out = Path(out_dir)
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    bb_fp = backbone_fingerprint(spec, device, tf32)
    loaded = Loaded()
    failures: list[dict[str, Any]] = []

    def failed(dataset: str, seed: int, exc: BaseException) -> None:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        failures.append({"dataset": dataset, "seed": seed, "error": message})
        say(f"{dataset} seed {seed}: FAILED: {message}")

    plans: dict[tuple[str, int], Any] = {}
    for dataset in datasets:
        for seed in seeds:
            try:
                plans[dataset, seed] = plan_run(
                    dataset,
                    data_root,
                    database_for(dataset, db_root),
                    spec=spec,
                    settings=ExtractSettings(views=settings.views, seed=seed),
                    descriptions=descriptions_for(dataset, settings.descriptions),
                    preset=None,
                    class_names_file=None,
                    allow_missing=False,
                    config=settings.config(dataset),
                    device=device,
                    on_ray=backend is not None,
                    tf32=tf32,
                )
            except RattaInputError as exc:
                failed(dataset, seed, exc)
    stages = {"check": time.perf_counter() - started}
    writes = [Write(out, "--out", "folder")]
    writes += [Write(out / name, "--out report") for name in REPORT_FILES]
    writes += [Write(out / "cells" / d / f"seed-{s}", "--out cell", "folder") for d, s in plans]
    reads = [
        *Read.of(data_root, "--data-root"),
        *Read.of(db_root, "--db-root"),
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
        for (dataset, seed), plan in plans.items():
            cell = out / "cells" / dataset / f"seed-{seed}"
            identity = {
                "format": CELL_FORMAT,
                "dataset": dataset,
                "seed": seed,
                "features": plan.features,
                "text": plan.text,
                "database": plan.database,
                "views": settings.views,
                "config": asdict(plan.config),
            }
            done = cell / "cell.json"
            try:
                old = _stored_identity(done)
                if not force and old == json.loads(json.dumps(identity)):
                    reused += 1
                    say(f"{dataset} seed {seed}: done before, reused")
                else:
                    why = reason(False, force, old, identity, "done before")
                    cell_started = time.perf_counter()
                    summary = run(
                        dataset,
                        data_root,
                        database_for(dataset, db_root),
                        cell,
                        backbone=spec,
                        settings=ExtractSettings(views=settings.views, seed=seed),
                        cache=cache,
                        device=device,
                        workers=workers,
                        progress=f"{label(progress, 'eval')} {dataset} seed {seed}"
                        if progress
                        else False,
                        backend=backend,
                        force=force,
                        plan=plan,
                        tf32=tf32,
                        profile=profile,
                        loaded=loaded,
                    )
                    t0 = time.perf_counter()
                    save_safetensors(
                        cell / "baselines.safetensors",
                        _softmax_predictions(
                            Path(summary["cache"]["features"]), Path(summary["cache"]["text"])
                        ),
                    )
                    cell_stages = dict(summary["stage_seconds"])
                    cell_stages["baselines"] = time.perf_counter() - t0
                    for stage, secs in cell_stages.items():
                        stages[stage] = stages.get(stage, 0.0) + secs
                    seconds = time.perf_counter() - cell_started
                    write_json(
                        done,
                        {
                            "identity": identity,
                            "reason": why,
                            "summary": summary,
                            "seconds": seconds,
                        },
                    )
                    computed += 1
                    say(f"{dataset} seed {seed}: {why}; {format_times(seconds, cell_stages)}")
                rows.extend(cell_rows(cell, dataset, seed))
            except (RattaInputError, OSError, RuntimeError, ValueError) as exc:
                failed(dataset, seed, exc)
        report = {
            **stamp(),
            "backbone": bb_fp,
            "settings": asdict(settings),
            "datasets": list(datasets),
            "seeds": list(seeds),
            "cells_computed": computed,
            "cells_reused": reused,
            "skipped_images": sum(r["skipped"] for r in rows if r["method"] == "ratta"),
            "failures": failures,
            "rows": rows,
        }
        write_reports(out, report, started, stages)
    return report


def _stored_identity(done: Path) -> Any:
    try:
        return json.loads(done.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- reports

CSV_FIELDS = (
    "dataset",
    "seed",
    "method",
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
            [_csv_value(r[f]) for f in CSV_FIELDS]
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


def aggregate(rows: Sequence[dict[str, Any]], metric: str = "top1") -> dict:
    """{dataset: {method: (mean, std, seeds)}} over the seeds."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        values.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r[metric])
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


def markdown_report(report: dict[str, Any]) -> str:
    """results.md: the paper's layout, our methods beside the published figures.

    A published figure stands beside ours only where it covers the same datasets: per
    dataset, and for an average only over exactly the datasets averaged here
    (:func:`ratta.published.published_average`); the sources are listed below the tables.
    """
    agg = aggregate(report["rows"])
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
    for title, names in (("Transfer datasets", TRANSFER), ("ImageNet distribution shifts", SHIFTS)):
        present = [d for d in names if d in agg]
        if not present:
            continue
        pub_names = [f"published {PUBLISHED_NAMES[m]}" for m in PUBLISHED_COLUMNS]
        lines += [
            f"## {title}",
            "",
            "| dataset | " + " | ".join([*METHODS.values(), *pub_names]) + " | Δ |",
            "|---|" + "---:|" * (len(METHODS) + len(PUBLISHED_COLUMNS) + 1),
        ]
        for d in present:
            figures = {m: published(m, d) for m in PUBLISHED_COLUMNS}
            shown += figures.values()
            lines.append(_row(d, agg[d], figures))
        means = {m: _average(report["rows"], present, m) for m in METHODS}
        figures = {m: published_average(m, present) for m in PUBLISHED_COLUMNS}
        shown += figures.values()
        derived = derived or any(f is not None and f.derived for f in figures.values())
        lines += [_row(f"Average ({len(present)} of {len(names)})", means, figures), ""]
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
    rows: Sequence[dict[str, Any]], datasets: Sequence[str], method: str
) -> tuple[float, float, int] | None:
    """Mean ± std over seeds of the per-seed average over ``datasets`` (seeds having all)."""
    per_seed: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["method"] == method and r["dataset"] in datasets:
            per_seed.setdefault(r["seed"], {})[r["dataset"]] = r["top1"]
    averages = [statistics.fmean(v.values()) for v in per_seed.values() if len(v) == len(datasets)]
    if not averages:
        return None
    std = statistics.stdev(averages) if len(averages) > 1 else 0.0
    return statistics.fmean(averages), std, len(averages)


def _published_cell(figure: Figure | None) -> str:
    if figure is None:
        return "–"
    return f"{figure.top1:.2f}" + (DERIVED_MARK if figure.derived else "")


def _row(name: str, stats: dict, figures: dict[str, Figure | None]) -> str:
    cells = [_fmt(stats.get(m)) for m in METHODS]
    ours, theirs = stats.get("ratta"), figures.get("ratta")
    delta = f"{ours[0] - theirs.top1:+.2f}" if ours is not None and theirs is not None else "–"
    pubs = [_published_cell(figures[m]) for m in PUBLISHED_COLUMNS]
    return f"| {name} | " + " | ".join([*cells, *pubs, delta]) + " |"


# --------------------------------------------------------------------------- sweeps

SWEEP_PARAMS = ("k_d", "k_s", "quantile", "min_desc", "views")


def sweep_values(param: str, values: Sequence[float], views: int) -> list[float | int]:
    """The values of a sweep, checked before any work: finite, in range, integers where
    the parameter is one, each given once."""
    if param not in SWEEP_PARAMS:
        raise RattaInputError(f"--param must be one of {', '.join(SWEEP_PARAMS)}, got '{param}'")
    if not values:
        raise RattaInputError("--values: give at least one value")
    out: list[float | int] = []
    for value in distinct(list(values), "--values"):
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


def sweep(
    param: str,
    values: Sequence[float],
    dataset: str,
    data_root: str | os.PathLike[str],
    db: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backbone: BackboneSpec | None = None,
    views: int = 100,
    seed: int = 0,
    descriptions: str = "auto",
    config: RATTAConfig | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    workers: int = 2,
    progress: Progress = False,
    backend: RayBackend | None = None,
    force: bool = False,
    tf32: bool = False,
    profile: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy of CuPL and RA-TTA for each value of one hyperparameter, on cached features.

    The features are extracted once (with ``views`` views); a sweep over ``views`` adapts with
    the first V' of them. ``config`` holds the other hyperparameters (default: the dataset's
    preset). Every value and input is checked before the first run; the model and the
    database are loaded once. Writes sweep_<param>.csv/.json and a plot into ``out_dir``.
    """
    from ratta.plots import plot_sweep
    from ratta.run import Loaded, plan_run, run

    checked = sweep_values(param, values, views)
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
            preset=None,
            class_names_file=None,
            allow_missing=False,
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
            digest = hashlib.sha256(f"{param}={value}".encode()).hexdigest()[:8]
            summary = run(
                dataset,
                data_root,
                db,
                out / "runs" / f"{param}-{value}-{digest}",
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
        write_json(
            out / names[0],
            {
                **stamp(),
                "dataset": dataset,
                "seed": seed,
                "fixed": config_used,
                "results": results,
            },
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
        write_text_atomic(out / names[1], buf.getvalue())
        plot_sweep(results, param, dataset, out / names[2])
    return results
