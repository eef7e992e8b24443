"""Writing a world to disk: the web corpus, the shifted test split, the class descriptions.

Layout of ``out/``::

    world.json                    settings, counts, class names, files
    descriptions.json             CuPL JSON: class name -> sentences
    corpus/shard-<k>.tar          webdataset shards: <key>.jpg + <key>.txt (the caption)
    test/images/<class>/<i>.jpg   the shifted test split, CoOp's folder layout
    test/split_ratta_world.json   CoOp split file: {"train": [], "val": [],
                                  "test": [[path under images/, label, class name], ...]}
    test/attributes.csv           per test image: shift and attributes

Item ``i`` of a split is drawn from its own generator, seeded by (seed, split, i), so the
world is the same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ratta.atomic import write_json
from ratta.errors import RattaInputError
from ratta.world.draw import Scene, render
from ratta.world.scenes import (
    SHIFTS,
    caption,
    class_weights,
    corpus_scene,
    descriptions,
    shifted_scene,
)
from ratta.world.vocabulary import CLASSES

# Bump when a change to the generator changes the pictures or texts of a seed.
WORLD_VERSION = 1
SPLIT_FILE = "split_ratta_world.json"
_CORPUS, _TEST = 0, 1
_JPEG_QUALITY = 90
_CHUNK = 500


@dataclass(frozen=True)
class WorldSettings:
    """What a world depends on besides the code (``WORLD_VERSION``)."""

    seed: int = 0
    corpus_size: int = 24000
    test_per_class: int = 21
    image_size: int = 64
    shard_size: int = 4000

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise RattaInputError(f"--seed must be >= 0, got {self.seed}")
        for name in ("corpus_size", "test_per_class", "image_size", "shard_size"):
            if getattr(self, name) < 1:
                raise RattaInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise RattaInputError(f"image_size must be >= 16, got {self.image_size}")


@dataclass(frozen=True)
class CorpusItem:
    key: str
    scene: Scene
    caption: str


@dataclass(frozen=True)
class ShiftedItem:
    index: int
    scene: Scene
    shift: str

    @property
    def path(self) -> str:
        """Relative to ``test/images``."""
        return f"{CLASSES[self.scene.label].folder}/{self.index:05d}.jpg"


def corpus_item(settings: WorldSettings, index: int) -> CorpusItem:
    """Corpus picture ``index``: its class drawn from the long-tailed class frequencies."""
    rng = np.random.default_rng([settings.seed, _CORPUS, index])
    label = int(rng.choice(len(CLASSES), p=class_weights(settings.seed)))
    scene = corpus_scene(rng, label)
    return CorpusItem(f"c{index:07d}", scene, caption(scene, rng))


def shifted_item(settings: WorldSettings, index: int) -> ShiftedItem:
    """Test picture ``index``: class-major order, the shifts in turn within a class."""
    rng = np.random.default_rng([settings.seed, _TEST, index])
    label, k = divmod(index, settings.test_per_class)
    shift = SHIFTS[k % len(SHIFTS)]
    return ShiftedItem(index, shifted_scene(rng, label, shift), shift)


def encode(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render(scene, size).save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _corpus_chunk(args: tuple[WorldSettings, int, int]) -> list[tuple[str, bytes, str]]:
    settings, start, stop = args
    out = []
    for i in range(start, stop):
        item = corpus_item(settings, i)
        out.append((item.key, encode(item.scene, settings.image_size), item.caption))
    return out


def _test_chunk(args: tuple[WorldSettings, int, int]) -> list[tuple[ShiftedItem, bytes]]:
    settings, start, stop = args
    items = [shifted_item(settings, i) for i in range(start, stop)]
    return [(it, encode(it.scene, settings.image_size)) for it in items]


def _chunks(settings: WorldSettings, n: int) -> list[tuple[WorldSettings, int, int]]:
    return [(settings, s, min(n, s + _CHUNK)) for s in range(0, n, _CHUNK)]


def _parallel(fn: Callable, jobs: list, workers: int) -> Iterator:
    """``map(fn, jobs)`` in order, over ``workers`` processes (none when ``workers`` <= 1)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # fork, as DataLoader workers do: spawn would rerun a caller's script without a main guard
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, jobs)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _write_corpus(folder: Path, settings: WorldSettings, workers: int) -> list[str]:
    folder.mkdir()
    chunks = _parallel(_corpus_chunk, _chunks(settings, settings.corpus_size), workers)
    items = (item for chunk in chunks for item in chunk)
    shards: list[str] = []
    while batch := list(itertools.islice(items, settings.shard_size)):
        shards.append(f"shard-{len(shards):05d}.tar")
        with tarfile.open(folder / shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, text in batch:
                _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.txt", text.encode())
    return shards


_ATTRIBUTES = ("colour", "texture", "size", "pose", "background", "clutter", "occluders")


def _write_test(folder: Path, settings: WorldSettings, workers: int) -> int:
    images = folder / "images"
    for cls in CLASSES:
        (images / cls.folder).mkdir(parents=True)
    rows: list[list[Any]] = []
    table: list[list[Any]] = []
    n = settings.test_per_class * len(CLASSES)
    for chunk in _parallel(_test_chunk, _chunks(settings, n), workers):
        for item, jpeg in chunk:
            (images / item.path).write_bytes(jpeg)
            name = CLASSES[item.scene.label].name
            rows.append([item.path, item.scene.label, name])
            attrs = [getattr(item.scene, a) for a in _ATTRIBUTES]
            table.append([item.index, item.path, item.scene.label, name, item.shift, *attrs])
            table[-1].append(round(item.scene.noise, 1))
    (folder / SPLIT_FILE).write_text(json.dumps({"train": [], "val": [], "test": rows}) + "\n")
    with open(folder / "attributes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "path", "label", "class", "shift", *_ATTRIBUTES, "noise"])
        writer.writerows(table)
    return n


def _manifest(settings: WorldSettings) -> dict[str, Any]:
    return {"world_version": WORLD_VERSION, "settings": asdict(settings)}


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``world.json`` of a world folder, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(out) / "world.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_world(
    out: str | os.PathLike[str], settings: WorldSettings | None = None, *, workers: int = 2
) -> dict[str, Any]:
    """Generate the world of ``settings`` into the folder ``out``.

    Returns the manifest (``world.json``) plus ``reused`` and, for a new world, ``seconds``
    (generation times, not part of the world's bytes).

    A folder that already holds the world of the same settings and generator version is
    kept as it is (its manifest is returned). Any other existing ``out`` is an error. The
    world is written into a temporary folder beside ``out`` and renamed when complete, so an
    interrupted run leaves no partial world.
    """
    settings = settings or WorldSettings()
    target = Path(out)
    existing = read_manifest(target)
    if existing is not None and {k: existing.get(k) for k in ("world_version", "settings")} == (
        _manifest(settings)
    ):
        return {**existing, "reused": True}
    if target.exists():
        raise RattaInputError(
            f"{target}: exists and is not the world of these settings; remove it or choose "
            "another folder"
        )
    if not target.parent.is_dir():
        raise RattaInputError(f"{target}: parent folder {target.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        started = time.perf_counter()
        shards = _write_corpus(tmp / "corpus", settings, workers)
        corpus_s = time.perf_counter() - started
        tests = _write_test(tmp / "test", settings, workers)
        write_json(tmp / "descriptions.json", descriptions())
        manifest = {
            **_manifest(settings),
            "classes": [c.name for c in CLASSES],
            "corpus": {"images": settings.corpus_size, "shards": [f"corpus/{s}" for s in shards]},
            "test": {
                "images": tests,
                "shifts": list(SHIFTS),
                "folder": "test/images",
                "split": f"test/{SPLIT_FILE}",
            },
            "descriptions": "descriptions.json",
        }
        write_json(tmp / "world.json", manifest)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the world private
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = {"corpus": corpus_s, "total": time.perf_counter() - started}
    return {**manifest, "reused": False, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
