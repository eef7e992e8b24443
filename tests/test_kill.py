"""A ``kill -9`` at any point, then a rerun: the same bytes as a run never interrupted.

Real processes, killed with SIGKILL while they write: an import when its temporary folder
appears, while it writes shards and just before its rename; a database build after two of
its twelve chunks of images.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import write_images

from ratta.cli import main

RATTA = str(Path(sys.executable).with_name("ratta"))


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path, keep: set[str]) -> set[str]:
    return {p.name for p in parent.iterdir()} - keep


def kill_after(argv: list[str], ready, timeout: float = 120) -> None:
    """Start the CLI, SIGKILL it as soon as ``ready()`` holds (or it ends)."""
    proc = subprocess.Popen([RATTA, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_db_import_killed_at_any_moment_reruns_to_the_same_bytes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src.npy"
    vecs = rng.standard_normal((150_000, 32)).astype(np.float32)
    np.save(src, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    args = ["db", "import", str(src), "--shard-rows", "5000", "--quiet", "--out"]
    ref = tmp_path / "ref"
    assert main([*args, str(ref)]) == 0
    work = tmp_path / "work"
    work.mkdir()
    out = work / "db"

    def temporary(*inside: str):
        """Ready once the writer's temporary folder holds ``inside``."""
        return lambda: any(t.joinpath(*inside).exists() for t in work.glob(".db.*.tmp"))

    # the moments: folder created, shards being written; and when the manifest is written,
    # which may already be after the rename (a finished import, which the rerun refuses)
    for ready in (temporary(), temporary("embeddings", "000003.npy")):
        kill_after([*args, str(out)], ready)
        assert not out.exists()
        assert [p.name for p in work.glob(".db.*.tmp")], "the kill must land mid-write"
    kill_after([*args, str(out)], temporary("manifest.json"))
    if not out.exists():
        assert main([*args, str(out)]) == 0
    assert tree(out) == tree(ref)
    assert leftovers(work, set()) == {"db"}


def test_db_build_killed_after_a_chunk_resumes_to_the_same_bytes(tiny_clip, tmp_path) -> None:
    from PIL import Image

    images = tmp_path / "imgs"
    write_images(images, 4)
    rng = np.random.default_rng(1)
    for i in range(44):  # large noise PNGs: ten chunks of real work left after the second
        pixels = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"big{i:02d}.png")
    args = ["db", "build", "--images", str(images), "--chunk-size", "4", "--workers", "0"]
    args += ["--model-config", str(tiny_clip["config"])]
    args += ["--pretrained", str(tiny_clip["checkpoint"]), "--quiet", "--out"]
    ref = tmp_path / "ref"
    assert main([*args, str(ref)]) == 0
    work = tmp_path / "work"
    work.mkdir()
    out = work / "db"
    parts = work / "db.build" / "features.safetensors.parts"
    kill_after([*args, str(out)], lambda: len(list(parts.glob("chunk-*.safetensors"))) >= 2)
    assert not out.exists(), "the build ended before the kill: give it more work"
    assert parts.is_dir()
    assert main([*args, str(out)]) == 0
    assert tree(out) == tree(ref)
    assert leftovers(work, set()) == {"db"}


def test_ctrl_c_during_extract_leaves_no_partial_file_and_resumes(tiny_clip, tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    for i in range(6):  # large PNGs decode slowly enough to be interrupted mid-run
        pixels = rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    args = ["extract", "--dataset", "folder", "--data-root", str(tmp_path / "imgs")]
    args += ["--views", "2", "--chunk-size", "1", "--workers", "0", "--quiet"]
    args += ["--model-config", str(tiny_clip["config"])]
    args += ["--pretrained", str(tiny_clip["checkpoint"]), "--out"]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "f.safetensors"
    parts = Path(f"{out}.parts")
    proc = subprocess.Popen([RATTA, *args, str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(parts.glob("chunk-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists() and leftovers(work, set()) == {"f.safetensors.parts"}
    assert main([*args, str(out)]) == 0
    whole = tmp_path / "whole.safetensors"
    assert main([*args, str(whole)]) == 0
    assert out.read_bytes() == whole.read_bytes()
    assert leftovers(work, set()) == {"f.safetensors", "f.safetensors.json"}
