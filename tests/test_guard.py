"""Hostile use, class 1: an output never destroys an input; one writer per output; no debris.

Every case runs the real command and checks three things: exit code 2 with one line on
stderr, the input's bytes unchanged, and no file written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import adapt_args, extract_argv, make_coop_dtd

from ratta.cli import main
from ratta.errors import RattaInputError
from ratta.guard import Read, Write, check_writes, claim, lock_path, output_lock

RATTA = str(Path(sys.executable).with_name("ratta"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) with its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


def refused(argv: list[str], capsys, root: Path, needle: str) -> None:
    """``argv`` exits 2 with one line containing ``needle``, and ``root`` is unchanged."""
    before = snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
    assert snapshot(root) == before


@pytest.mark.parametrize("target", ["features", "text", "db"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_adapt_out_never_replaces_an_input(world_files, tmp_path, capsys, target, how) -> None:
    out = world_files[target]
    if how == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(world_files[target])
    elif how == "hardlink":
        out = tmp_path / "hard.safetensors"
        os.link(world_files[target], out)
    refused(adapt_args(world_files, out), capsys, tmp_path, "must not replace an input")


def test_adapt_summary_never_replaces_an_input(world_files, tmp_path, capsys) -> None:
    # the summary OUT.json would land on the text file
    text = tmp_path / "pred.safetensors.json"
    shutil.copy(world_files["text"], text)
    argv = adapt_args({**world_files, "text": text}, tmp_path / "pred.safetensors")
    refused(argv, capsys, tmp_path, "is the input --text")


@pytest.mark.parametrize("kind", ["fifo", "socket", "chardev"])
def test_special_files_are_never_replaced(world_files, tmp_path, capsys, kind) -> None:
    if kind == "fifo":
        out = tmp_path / "fifo"
        os.mkfifo(out)
    elif kind == "socket":
        out = tmp_path / "sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(out))
    else:
        out = Path("/dev/null")
    mode = out.stat().st_mode
    assert main(adapt_args(world_files, out)) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and err.count("\n") == 1
    assert out.stat().st_mode == mode and not stat.S_ISREG(out.stat().st_mode)


def test_text_out_never_replaces_the_descriptions(tiny_clip, tmp_path, capsys) -> None:
    root = tmp_path / "data"
    make_coop_dtd(root)
    desc = tmp_path / "cupl.json"
    desc.write_text(json.dumps({"zigzagged": ["a."], "banded": ["b."], "woven fabric": ["c."]}))
    base = ["text", "--dataset", "dtd", "--data-root", str(root), "--descriptions", str(desc)]
    base += [
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
    ]
    refused([*base, "--out", str(desc)], capsys, tmp_path, "--descriptions")
    # the summary OUT.json would be the descriptions file
    refused([*base, "--out", str(desc)[: -len(".json")]], capsys, tmp_path, "--descriptions")


def test_extract_out_never_replaces_an_image_the_split_or_the_checkpoint(
    tiny_clip, tmp_path, capsys
) -> None:
    root = tmp_path / "data"
    paths, _ = make_coop_dtd(root)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    assert split.is_file()
    elsewhere = tmp_path / "elsewhere.jpg"
    os.link(paths[0], elsewhere)
    for victim, needle in (
        (paths[0], "is the input image"),
        (elsewhere, "is the input image"),
        (split, "is the input split file"),
        (tiny_clip["checkpoint"], "is the input --pretrained"),
        (root / "new" / "f.safetensors", "lies inside the input --data-root"),
    ):
        argv = extract_argv(tiny_clip, root, "--views", "1", "--out", str(victim))
        refused(argv, capsys, tmp_path, needle)


def test_missing_parent_folders_are_created_for_every_command(world_files, tmp_path) -> None:
    out = tmp_path / "a" / "b" / "pred.safetensors"
    assert main(adapt_args(world_files, out)) == 0
    assert out.is_file() and Path(f"{out}.json").is_file()
    db = tmp_path / "dbs" / "deep" / "web"
    assert main(["db", "import", str(world_files["db"]), "--out", str(db), "--quiet"]) == 0
    assert (db / "manifest.json").is_file()


def test_bad_input_leaves_no_created_folder_behind(world_files, tmp_path, capsys) -> None:
    out = tmp_path / "new" / "deeper" / "pred.safetensors"
    assert main(adapt_args(world_files, out, "--k-s", "0")) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(world_files, tmp_path, umask) -> None:
    out = tmp_path / "o" / "pred.safetensors"
    db = tmp_path / "o" / "db"
    old = os.umask(umask)
    try:
        assert main(adapt_args(world_files, out)) == 0
        assert main(["db", "import", str(world_files["db"]), "--out", str(db), "--quiet"]) == 0
    finally:
        os.umask(old)
    for p in [out, Path(f"{out}.json"), *db.rglob("*")]:
        expected = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == expected, p
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o777 & ~umask


def test_a_second_process_on_the_same_out_stops_with_one_line(world_files, tmp_path) -> None:
    out = tmp_path / "pred.safetensors"
    with output_lock(out):  # this test process is the first writer
        proc = subprocess.run(
            [RATTA, *adapt_args(world_files, out)], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert f"another ratta process (pid {os.getpid()}) is writing it" in proc.stderr
    assert not out.exists()
    # once released, the same command runs and removes the lock file
    assert main(adapt_args(world_files, out)) == 0
    assert out.is_file() and not lock_path(out).exists()


def test_cache_entries_are_waited_for_not_refused(tmp_path) -> None:
    target = tmp_path / "cache" / "x.safetensors"
    code = (
        "import sys\n"
        "from ratta.guard import Write, claim\n"
        f"with claim([Write.of({str(target)!r}, 'cache')], wait=True):\n"
        "    print('got it', flush=True)\n"
    )
    with claim([Write(target, "cache")]):
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    out, err = proc.communicate(timeout=60)
    assert out == "got it\n" and "waiting for another process" in err


def test_kill_9_debris_and_stale_lock_are_cleaned_by_the_rerun(world_files, tmp_path) -> None:
    out = tmp_path / "pred.safetensors"
    debris = [
        tmp_path / ".pred.safetensors.k3j_x9a2.tmp",  # atomic_path's temp file
        tmp_path / ".pred.safetensors.json.0a1b2c3d.tmp",
    ]
    for d in debris:
        d.write_bytes(b"half")
    lock_path(out).write_text("999999\n")  # left by a killed process; the kernel freed it
    keep = tmp_path / ".pred.safetensors.notours"
    keep.write_text("x")
    assert main(adapt_args(world_files, out)) == 0
    assert not any(d.exists() for d in debris) and not lock_path(out).exists()
    assert keep.exists()


def test_killed_db_import_leaves_a_folder_the_rerun_removes(world_files, tmp_path) -> None:
    out = tmp_path / "db"
    half = tmp_path / ".db.ab12cd34.tmp"  # DatabaseWriter's temporary folder
    (half / "embeddings").mkdir(parents=True)
    (half / "embeddings" / "000000.npy").write_bytes(b"partial")
    assert main(["db", "import", str(world_files["db"]), "--out", str(out), "--quiet"]) == 0
    assert not half.exists() and (out / "manifest.json").is_file()


def test_check_writes_rules() -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    with pytest.raises(RattaInputError, match="the same path as --report"):
        check_writes([Write(tmp / "r", "--report"), Write(tmp / "r", "--write-clean", "dir")], [])
    with pytest.raises(RattaInputError, match="is a directory"):
        check_writes([Write(tmp, "--out")], [])
    with pytest.raises(RattaInputError, match="already exists"):
        check_writes([Write(tmp, "--out", "dir")], [])
    with pytest.raises(RattaInputError, match="is not a folder"):
        check_writes([Write(Path(sys.executable) / "x" / "y", "--out")], [])
    with pytest.raises(RattaInputError, match="lies inside the input"):
        check_writes([Write(tmp / "a" / "b", "--out")], Read.of(tmp, "--data-root"))


def test_scratch_folders_never_hold_an_input(world_files, tmp_path, capsys) -> None:
    # adapt's chunk folder OUT.parts is deleted at the end: an input inside it is refused
    parts = tmp_path / "pred.safetensors.parts"
    parts.mkdir()
    shutil.copy(world_files["db"], parts / "db.npy")
    argv = adapt_args({**world_files, "db": parts / "db.npy"}, tmp_path / "pred.safetensors")
    refused(argv, capsys, tmp_path, "working folder is deleted at the end")


def test_db_build_and_select_never_write_into_their_sources(world_files, tmp_path, capsys) -> None:
    db = tmp_path / "corpus"
    assert main(["db", "import", str(world_files["db"]), "--out", str(db), "--quiet"]) == 0
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    argv = ["db", "select", "--corpus", str(db), "--classes", str(classes), "--by", "caption"]
    refused([*argv, "--out", str(db / "sub")], capsys, tmp_path, "lies inside the input --corpus")
