"""Hostile use, class 3: what used to be a traceback is one line and exit 2, found early."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import adapt_args, extract_argv, make_coop_dtd
from safetensors.torch import load_file

from ratta.cli import main
from ratta.errors import RattaInputError


def one_line(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty (0 bytes), not a .npy array"),
        (b"0.1 0.2\n0.3 0.4\n", "is a text file, not a .npy array"),
        (pickle.dumps(np.ones((3, 4))), "is a Python pickle, not a .npy array"),
        (b"\x93NUMPY\x01\x00\xff\x00{'descr'", "malformed .npy header"),
    ],
)
def test_a_database_that_is_not_an_npy_array_is_named(
    world_files, tmp_path, capsys, content, needle
) -> None:
    db = tmp_path / "db.npy"
    db.write_bytes(content)
    out = tmp_path / "o.safetensors"
    assert main(adapt_args({**world_files, "db": db}, out)) == 2
    one_line(capsys, needle)
    assert "allow_pickle" not in capsys.readouterr().err and not out.exists()


def imported(world_files, tmp_path) -> Path:
    db = tmp_path / "db"
    assert main(["db", "import", str(world_files["db"]), "--out", str(db), "--quiet"]) == 0
    return db


def edit_manifest(db: Path, **changes) -> None:
    manifest = json.loads((db / "manifest.json").read_text())
    for key, value in changes.items():
        if callable(value):
            value(manifest)
        else:
            manifest[key] = value
    (db / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_problems_are_one_line(world_files, tmp_path, capsys) -> None:
    db = imported(world_files, tmp_path)
    out = tmp_path / "o.safetensors"
    for change, needle in (
        ({"dtype": "complex512"}, "'dtype' must be float16 or float32"),
        ({"dtype": ["float16"]}, "'dtype' must be float16 or float32"),
        (
            {"shards": lambda m: m["shards"][0].update(file="../../../etc/passwd")},
            "lies outside the database folder",
        ),
        (
            {"shards": lambda m: m["shards"][0].update(file="/etc/passwd")},
            "lies outside the database folder",
        ),
    ):
        backup = (db / "manifest.json").read_text()
        edit_manifest(db, **change)
        assert main(adapt_args({**world_files, "db": db}, out)) == 2
        one_line(capsys, needle)
        (db / "manifest.json").write_text(backup)
    assert not out.exists()


def test_an_empty_shard_is_one_line(world_files, tmp_path, capsys) -> None:
    db = imported(world_files, tmp_path)
    shard = next((db / "embeddings").glob("*.npy"))
    shard.write_bytes(b"")
    assert main(adapt_args({**world_files, "db": db}, tmp_path / "o.safetensors")) == 2
    one_line(capsys, "is empty (0 bytes)")
    assert main(["db", "info", str(db)]) == 2
    one_line(capsys, "is empty (0 bytes)")


def test_db_info_without_index_measurements_says_so(world_files, tmp_path, capsys) -> None:
    db = imported(world_files, tmp_path)
    (db / "index-x.faiss").write_bytes(b"")
    edit_manifest(db, index={"spec": "IVF4,Flat", "file": "index-x.faiss"})
    assert main(["db", "info", str(db)]) == 0
    assert "IVF4,Flat: no recall measurements in the manifest" in capsys.readouterr().out


@pytest.mark.parametrize("params", ["nprobe=-1", "nprobe=nan", "nprobe=1e12", "nprobe", ""])
def test_invalid_faiss_search_parameters_are_one_line(world_files, tmp_path, capsys, params):
    db = imported(world_files, tmp_path)
    argv = ["db", "index", "--db", str(db), "--index", "IVF4,Flat", "--search-params", params]
    assert main([*argv, "--quiet"]) == 2
    one_line(capsys, "--search-params")


def test_a_huge_k_d_is_capped_by_the_classes_not_the_memory(world, world_files, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    assert main(adapt_args(world_files, out, "--k-d", "1000000000", "--min-desc", "1")) == 0
    got = load_file(str(out))
    assert got["candidates"].shape == (world.labels.shape[0], world.text.num_classes)


def test_views_whose_buffers_cannot_fit_are_refused_with_the_estimate(
    tiny_clip, tmp_path, capsys
) -> None:
    root = tmp_path / "data"
    make_coop_dtd(root)
    out = tmp_path / "f.safetensors"
    assert main(extract_argv(tiny_clip, root, "--views", "100000000", "--out", str(out))) == 2
    one_line(capsys, "of memory for its buffers, but")
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_workers_beyond_the_cpus_are_capped_with_a_note(tiny_clip, tmp_path, capsys) -> None:
    root = tmp_path / "data"
    make_coop_dtd(root, per_class=1)
    out = tmp_path / "f.safetensors"
    argv = extract_argv(tiny_clip, root, "--views", "1", "--out", str(out))
    argv[argv.index("--workers") + 1] = "512"
    with pytest.warns(UserWarning, match="--workers 512 is more than the"):
        assert main(argv) == 0


def test_offline_default_weights_fail_within_five_seconds(tmp_path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "import time\n"
        "from ratta.backbones import BackboneSpec, load_backbone\n"
        "from ratta.errors import RattaInputError\n"
        "import open_clip\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_backbone(BackboneSpec())\n"
        "except RattaInputError as exc:\n"
        "    print(round(time.perf_counter() - t, 2), exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 5.0 and "--pretrained PATH" in message


def ro_mount_available() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind / /mnt && mount -o remount,bind,ro /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def run_read_only(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI with ``folder`` mounted read-only (a private mount namespace, so even root
    cannot write there); chmod 0555 where mount namespaces are not permitted."""
    ratta = str(Path(sys.executable).with_name("ratta"))
    quoted = " ".join(f"'{a}'" for a in argv)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run([ratta, *argv], capture_output=True, text=True, timeout=300)
        finally:
            folder.chmod(0o755)
    script = (
        f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && "
        f"exec '{ratta}' {quoted}"
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(
    os.geteuid() == 0 and not ro_mount_available(), reason="no read-only bind mounts here"
)
def test_read_only_out_cache_and_report_are_refused_before_any_work(
    world_files, tiny_clip, tmp_path
) -> None:
    root = tmp_path / "data"
    make_coop_dtd(root)
    desc = tmp_path / "cupl.json"
    names = ["zigzagged", "banded", "woven fabric"]
    desc.write_text(json.dumps({n: [f"A {n}.", f"The {n}."] for n in names}))
    ro = tmp_path / "ro"
    ro.mkdir()
    run = ["run", "--dataset", "dtd", "--data-root", str(root), "--db", str(world_files["db"])]
    run += ["--descriptions", str(desc), "--views", "1", "--workers", "0", "--quiet"]
    run += ["--model-config", str(tiny_clip["config"])]
    run += ["--pretrained", str(tiny_clip["checkpoint"])]
    audit = ["db", "audit", "--db", str(world_files["db"])]
    audit += ["--features", str(world_files["features"])]
    cases = [
        ([*run, "--out", str(ro / "r"), "--cache", str(tmp_path / "c")], "--out"),
        ([*run, "--out", str(tmp_path / "r"), "--cache", str(ro / "c")], "--cache"),
        ([*audit, "--report", str(ro / "a.json")], "--report"),
    ]
    for argv, flag in cases:
        started = time.perf_counter()
        proc = run_read_only(ro, argv)
        assert proc.returncode == 2, proc.stderr
        assert (
            proc.stderr.count("\n") == 1 and flag in proc.stderr and "not writable" in proc.stderr
        )
        assert time.perf_counter() - started < 60
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
    assert list(ro.iterdir()) == []
    shutil.rmtree(ro)


def test_an_adapt_batch_that_cannot_fit_is_refused_with_the_estimate(
    world_files, tmp_path, capsys, monkeypatch
) -> None:
    import ratta.adapt

    monkeypatch.setattr(ratta.adapt, "available_memory", lambda: 1 << 16)
    out = tmp_path / "o.safetensors"
    assert main(adapt_args(world_files, out, "--batch-size", "1000000")) == 2
    one_line(capsys, "test images x 13 embeddings x 32 need about")
    assert not out.exists()


def test_a_streamed_file_larger_than_the_free_space_is_refused_before_writing(tmp_path) -> None:
    """1 TiB declared (the peers' or extract's file of a huge run): one line, no file."""
    import torch

    from ratta.files import SafetensorsStreamWriter

    out = tmp_path / "huge.safetensors"
    with pytest.raises(RattaInputError, match=r"needs 1024\.00 GiB, its filesystem has .* free"):
        SafetensorsStreamWriter(out, {"x": (torch.float32, (2**38,))})
    assert list(tmp_path.iterdir()) == []
    with SafetensorsStreamWriter(out, {"x": (torch.float32, (4,))}) as writer:
        writer.write("x", torch.ones(4))
    assert out.stat().st_size > 16


def test_extract_without_room_for_its_files_stops_before_encoding(
    tiny_clip, tmp_path, monkeypatch, capsys
) -> None:
    import ratta.atomic

    root = tmp_path / "data"
    make_coop_dtd(root)
    out = tmp_path / "work" / "f.safetensors"
    room = shutil.disk_usage(tmp_path)._replace(free=4096)  # less than 9 images x 11 rows
    monkeypatch.setattr(ratta.atomic.shutil, "disk_usage", lambda _: room)
    assert main(extract_argv(tiny_clip, root, "--views", "10", "--out", str(out))) == 2
    assert "its filesystem has 0.00 GiB free" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # no chunk, no folder left


def test_db_import_without_room_for_its_shards_stops_before_writing(
    tmp_path, monkeypatch, capsys
) -> None:
    import ratta.atomic

    src = tmp_path / "emb.npy"
    np.save(src, np.full((1000, 16), 0.25, dtype=np.float32))  # float32: 64,000 bytes
    room = shutil.disk_usage(tmp_path)._replace(free=60_000)
    monkeypatch.setattr(ratta.atomic.shutil, "disk_usage", lambda _: room)
    out = tmp_path / "dbs" / "web"
    assert main(["db", "import", str(src), "--quiet", "--out", str(out)]) == 2
    assert "the file needs 0.00 GiB, its filesystem has 0.00 GiB free" in capsys.readouterr().err
    assert not (tmp_path / "dbs").exists()
    room = room._replace(free=70_000)
    assert main(["db", "import", str(src), "--quiet", "--out", str(out)]) == 0
