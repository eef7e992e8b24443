"""``ratta demo``: the real pipeline on the generated world, run with ratta's own commands.

The world (:func:`ratta.world.write_world`) and the shipped CLIP go through ``ratta db
build`` (the web corpus), ``ratta extract`` (the shifted test split, with views), ``ratta
text`` (the world's CuPL descriptions), ``ratta db select --by caption``, ``ratta adapt
--save-retrieved`` and ``ratta explain --changed``, each run in this process through
:func:`ratta.cli.main` and printed as the command line it is. Top-1 of CLIP with one
template, CuPL, retrieval only and RA-TTA is then computed from the files they wrote.

Every step is cached by content: it is skipped when its stamp (``run/<step>.stamp``) holds
the key of its command line, ratta's version, the sha256 of the files it reads from outside
the demo (weights, model config, vocabulary, ``world.json``, descriptions) and the keys of
the steps it reads from; otherwise its old outputs are removed and it runs again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ratta import __version__
from ratta.atomic import write_json, write_text_atomic
from ratta.errors import RattaInputError
from ratta.identity import file_sha256, key_of
from ratta.world.model import MODEL_CONFIG, PACKAGE, VOCABULARY, WEIGHTS
from ratta.world.write import WORLD_VERSION, WorldSettings, read_manifest, write_world

MARKER = "ratta-world-demo.json"
# runs one ratta command line (without "ratta"), returns its exit status
Command = Callable[[list[str]], int]
METHODS = ("clip", "cupl", "retrieval", "ratta")
METHOD_NAMES = {
    "clip": "CLIP, one template",
    "cupl": "CuPL (zero-shot)",
    "retrieval": "retrieval only",
    "ratta": "RA-TTA",
}


@dataclass
class Step:
    """One ratta command of the demo: its arguments, what it writes, what it reads."""

    name: str
    argv: list[str]
    outputs: list[Path]
    needs: list[str] = field(default_factory=list)  # steps whose outputs it reads
    files: list[Path] = field(default_factory=list)  # inputs from outside the demo's steps


def _argv(*parts: str | Path | list[str]) -> list[str]:
    """The words of a command line: strings split at spaces, paths and lists kept whole."""
    words: list[str] = []
    for part in parts:
        words += part.split() if isinstance(part, str) else [str(w) for w in _listed(part)]
    return words


def _listed(part: Path | list[str]) -> list[Any]:
    return part if isinstance(part, list) else [part]


def plan(
    folder: Path, world: Path, weights: Path, *, views: int, workers: int, explain: int
) -> list[Step]:
    """The demo's commands, in order, for a world written in ``world``."""
    manifest = read_manifest(world)
    assert manifest is not None  # written just before
    run = folder / "run"
    images = world / "test" / "images"
    data = ["--dataset", "folder", "--data-root", str(images)]
    model = ["--model-config", str(MODEL_CONFIG), "--pretrained", str(weights)]
    model_files = [weights, MODEL_CONFIG, VOCABULARY]
    world_file = world / "world.json"
    descriptions = world / manifest["descriptions"]
    corpus, db, explained = run / "corpus-db", run / "db", run / "explain"
    features, text, pred = (run / f"{n}.safetensors" for n in ("features", "text", "predictions"))
    shards = [str(world / s) for s in manifest["corpus"]["shards"]]
    return [
        Step(
            "db build",
            _argv("db build --images", shards, "--out", corpus, model)
            + _argv(f"--workers {workers} --quiet"),
            [corpus],
            files=[world_file, *model_files],
        ),
        Step(
            "extract",
            _argv("extract", data, model, f"--views {views} --workers {workers}")
            + _argv("--out", features, "--quiet"),
            [features, Path(f"{features}.json")],
            files=[world_file, *model_files],
        ),
        Step(
            "text",
            _argv("text", data, model, "--descriptions", descriptions, "--out", text, "--quiet"),
            [text, Path(f"{text}.json")],
            files=[world_file, descriptions, *model_files],
        ),
        Step(
            "db select",
            _argv("db select --corpus", corpus, data, "--by caption --out", db, "--quiet"),
            [db],
            needs=["db build"],
            files=[world_file],
        ),
        Step(
            "adapt",
            _argv("adapt --features", features, "--text", text, "--db", db)
            + _argv("--save-retrieved --out", pred, "--quiet"),
            [pred, Path(f"{pred}.json")],
            needs=["extract", "text", "db select"],
        ),
        Step(
            "explain",
            _argv("explain --predictions", pred, "--features", features, "--text", text)
            + _argv("--db", db, "--data-root", images, f"--changed --limit {explain}")
            + _argv("--out", explained, "--quiet"),
            [explained],
            needs=["adapt"],
            files=[world_file],
        ),
    ]


def step_keys(steps: list[Step]) -> dict[str, str]:
    """What each step's outputs depend on: its command line, ratta's version, its outside
    files' bytes and the keys of the steps it reads."""
    keys: dict[str, str] = {}
    for step in steps:
        keys[step.name] = key_of(
            {
                "ratta_version": __version__,
                "argv": step.argv,
                "files": {str(f): file_sha256(f) for f in step.files},
                "needs": {n: keys[n] for n in step.needs},
            }
        )
    return keys


def _stamp(folder: Path, step: Step) -> Path:
    return folder / "run" / f"{step.name.replace(' ', '-')}.stamp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def shown(argv: list[str], folder: Path) -> str:
    """The command line as printed: the demo folder as $DEMO, the package's as $WORLD."""
    text = " ".join(["ratta", *argv])
    return text.replace(str(folder), "$DEMO").replace(str(PACKAGE), "$WORLD")


def run_steps(folder: Path, steps: list[Step], command: Command) -> dict[str, bool]:
    """Run each step whose stamp is not its key with ``command`` (``ratta.cli.main``);
    returns which ran."""
    keys = step_keys(steps)
    ran: dict[str, bool] = {}
    for step in steps:
        key = keys[step.name]
        stamp = _stamp(folder, step)
        done = stamp.is_file() and stamp.read_text().strip() == key
        if done and all(o.exists() for o in step.outputs):
            print(f"  (cached) {shown(step.argv, folder)}", flush=True)
            ran[step.name] = False
            continue
        for path in [stamp, *step.outputs]:
            _remove(path)
        print(f"$ {shown(step.argv, folder)}", flush=True)
        started = time.perf_counter()
        status = command(step.argv)
        if status != 0:
            raise RattaInputError(f"demo step `ratta {step.name}` failed (exit status {status})")
        print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
        write_text_atomic(stamp, key + "\n")
        ran[step.name] = True
    return ran


def top1_figures(run: Path, shifts: list[str]) -> dict[str, Any]:
    """Top-1 (%) of the four methods, overall and per kind of shift, recomputed from the
    per-image files: ``predictions.safetensors`` (CuPL, retrieval, RA-TTA) and the
    single-template classifier of ``text.safetensors`` on the features' center crops."""
    import torch
    from safetensors.torch import load_file

    from ratta.evaluate import baseline_predictions

    pred = load_file(str(run / "predictions.safetensors"))
    baselines = baseline_predictions(run / "features.safetensors", run / "text.safetensors")
    probs = {
        "clip": baselines["clip"],
        "cupl": pred["zero_shot"],
        "retrieval": pred["retrieval"],
        "ratta": pred["final"],
    }
    labels = pred["labels"]
    kinds = sorted(set(shifts))
    rows = {k: torch.tensor([s == k for s in shifts]) for k in kinds}
    out: dict[str, Any] = {"images": len(labels), "shifts": {k: int(rows[k].sum()) for k in kinds}}
    for method, p in probs.items():
        hit = (p.argmax(1) == labels).float()
        out[method] = {"all": round(100 * float(hit.mean()), 2)}
        out[method].update({k: round(100 * float(hit[rows[k]].mean()), 2) for k in kinds})
    changed = pred["final"].argmax(1) != pred["zero_shot"].argmax(1)
    out["changed"] = int(changed.sum())
    out["changed_to_right"] = int((changed & (pred["final"].argmax(1) == labels)).sum())
    out["changed_to_wrong"] = int((changed & (pred["zero_shot"].argmax(1) == labels)).sum())
    return out


def _shifts(world: Path) -> list[str]:
    import csv

    with open(world / "test" / "attributes.csv", newline="") as fh:
        return [row["shift"] for row in csv.DictReader(fh)]


def _claim_folder(folder: Path) -> None:
    """A new or empty folder becomes the demo's; any other must already be one."""
    marker = folder / MARKER
    if folder.exists() and not folder.is_dir():
        raise RattaInputError(f"--dir {folder}: not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not marker.is_file():
        raise RattaInputError(
            f"--dir {folder}: not empty and not a ratta world demo folder (no {MARKER}); "
            "choose a new or empty folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json(marker, {"what": "ratta world demo: every file here is regenerated"})


def default_folder() -> Path:
    """``<ratta cache>/world-demo``: kept between runs, so that later runs reuse every step."""
    from ratta.text import cache_dir

    return cache_dir() / "world-demo"


def run_world_demo(
    folder: str | os.PathLike[str] | None = None,
    *,
    command: Command,
    settings: WorldSettings | None = None,
    weights: str | os.PathLike[str] = WEIGHTS,
    views: int = 32,
    workers: int = 2,
    explain: int = 6,
) -> dict[str, Any]:
    """Generate the world (or reuse it), run the demo's commands with ``command`` (the
    ``ratta`` command line: :func:`ratta.cli.main`), print and return top-1.

    Writes ``results.json`` (the figures, the commands, the seconds) into ``folder``.
    """
    bounds = {"--views": (views, 1), "--workers": (workers, 0), "--explain": (explain, 1)}
    for name, (value, least) in bounds.items():
        if value < least:
            raise RattaInputError(f"{name} must be >= {least}, got {value}")
    settings = settings or WorldSettings()
    root = Path(folder) if folder is not None else default_folder()
    weights = Path(weights)
    if not weights.is_file():
        raise RattaInputError(f"{weights}: the world's CLIP weights are missing")
    _claim_folder(root)
    started = time.perf_counter()
    world = root / f"world-{key_of({**asdict(settings), 'version': WORLD_VERSION}, 12)}"
    for old in root.glob("world-*"):
        if old != world:  # another world of this demo folder: settings or generator changed
            _remove(old)
    print(f"world demo in {root} ($DEMO), model in {PACKAGE} ($WORLD)", flush=True)
    made = write_world(world, settings, workers=workers)
    print(
        f"world: {len(made['classes'])} classes, {made['corpus']['images']} captioned web "
        f"pictures, {made['test']['images']} shifted test pictures "
        f"({', '.join(made['test']['shifts'])}) "
        + ("(reused)" if made["reused"] else f"(generated in {made['seconds']['total']:.1f} s)"),
        flush=True,
    )
    steps = plan(root, world, weights, views=views, workers=workers, explain=explain)
    ran = run_steps(root, steps, command)
    figures = top1_figures(root / "run", _shifts(world))
    seconds = round(time.perf_counter() - started, 1)
    results = {
        "settings": asdict(settings),
        "views": views,
        "weights": str(weights),
        "top1": figures,
        "commands": [shown(s.argv, root) for s in steps],
        "ran": ran,
        "seconds": seconds,
    }
    write_json(root / "results.json", results)
    _print_figures(figures, root, world, seconds)
    return results


def _print_figures(figures: dict[str, Any], root: Path, world: Path, seconds: float) -> None:
    kinds = list(figures["shifts"])
    print(f"\ntop-1 % on the shifted test split ({figures['images']} pictures)")
    print(f"{'':<22}{'all':>8}" + "".join(f"{k:>10}" for k in kinds))
    for method in METHODS:
        row = figures[method]
        cells = "".join(f"{row[k]:10.2f}" for k in kinds)
        print(f"{METHOD_NAMES[method]:<22}{row['all']:8.2f}{cells}")
    print(
        f"RA-TTA changed {figures['changed']} predictions of CuPL: "
        f"{figures['changed_to_right']} to right, {figures['changed_to_wrong']} to wrong"
    )
    print("\nwhere to look:")
    print(f"  the test pictures               {world / 'test' / 'images'}/<class>/*.jpg")
    print(f"  why RA-TTA changed predictions  {root / 'run' / 'explain' / 'index.html'}")
    print(f"  the figures and the commands    {root / 'results.json'}")
    print(f"  per-image predictions           {root / 'run' / 'predictions.safetensors'}")
    print(f"demo done in {seconds:.1f} s (docs/world.md)")
