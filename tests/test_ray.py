"""The Ray backend: same outputs as the local one, killed workers, reruns, one-line errors.

One local Ray instance (2 CPUs) serves the module; models have random weights, images and
embeddings are generated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DTD_CLASSES, adapt_args, make_coop_dtd, write_images
from safetensors.torch import load_file, save_file

import ratta.extract as extract_mod
from ratta.adapt import adapt
from ratta.cli import main
from ratta.db import Database
from ratta.db.build import build_database
from ratta.db.select import select_by_caption, select_by_knn
from ratta.distributed import RayBackend, run_shards
from ratta.errors import RattaInputError
from ratta.extract import ChunkEncoder, ExtractSettings, extract_features
from ratta.synthetic import SyntheticWorld

ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install 'ratta[ray]'")

TWO = RayBackend(workers=2)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_thread():
    """Local runs use the torch threads of a 1-CPU Ray worker: the same bytes are promised
    across 1 and 2 threads (MKL's strict mode), not across any two thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    paths = write_images(tmp_path / "imgs", 11, seed=5)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    return [*paths[:4], tmp_path / "imgs" / "broken.jpg", *paths[4:]]


def extract(tiny_backbone, images: list[Path], out: Path, **kw) -> dict:
    kw.setdefault("workers", 0)
    return extract_features(
        images,
        [i % 4 for i in range(len(images))],
        tiny_backbone,
        out,
        ExtractSettings(views=4, seed=3, dtype="float32"),
        chunk_size=3,
        **kw,
    )


def encoder_that(action: str, chunk: int, marker: Path) -> type[ChunkEncoder]:
    """A chunk encoder whose worker, at chunk ``chunk``, after encoding it, is SIGKILLed
    once (``kill``: the marker file remembers) or raises on every attempt (``raise``).

    Defined in a function, so Ray pickles the class by value to its workers."""

    class Faulty(ChunkEncoder):
        def __call__(self, c: extract_mod.Chunk) -> extract_mod.EncodedChunk:
            encoded = super().__call__(c)
            if c.k == chunk and action == "raise":
                raise OSError("the disk went away")
            if c.k == chunk and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return encoded

    return Faulty


# ------------------------------------------------------------------------------ extract


def test_extract_on_ray_writes_the_bytes_of_a_local_run(
    tiny_backbone, images, tmp_path: Path, capsys
) -> None:
    extract(tiny_backbone, images, tmp_path / "local.safetensors")
    summary = extract(
        tiny_backbone, images, tmp_path / "ray.safetensors", backend=TWO, workers=1, progress=True
    )
    local = (tmp_path / "local.safetensors").read_bytes()
    assert (tmp_path / "ray.safetensors").read_bytes() == local
    shards = summary["shards"]
    assert (shards["shards"], shards["done"], shards["skipped"]) == (4, 4, 0)
    assert (shards["backend"], shards["workers"], shards["retried"]) == ("ray", 2, 0)
    assert summary["skipped"] == 1 and summary["skipped_images"][0]["path"].endswith("broken.jpg")
    err = capsys.readouterr().err
    assert "shards 4/4" in err and "image/s" in err  # the driver's progress over the cluster
    assert not Path(f"{tmp_path / 'ray.safetensors'}.parts").exists()


def test_one_two_thread_ray_worker_writes_the_bytes_of_a_two_thread_local_run(
    tiny_backbone, images, tmp_path: Path
) -> None:
    torch.set_num_threads(2)
    extract(tiny_backbone, images, tmp_path / "local.safetensors", workers=2, batch_size=5)
    backend = RayBackend(num_cpus_per_worker=2)
    extract(tiny_backbone, images, tmp_path / "ray.safetensors", backend=backend)
    assert (tmp_path / "ray.safetensors").read_bytes() == (
        tmp_path / "local.safetensors"
    ).read_bytes()


def test_two_one_cpu_workers_write_the_bytes_of_a_two_thread_local_run(
    tiny_backbone, images, tmp_path: Path
) -> None:
    torch.set_num_threads(2)  # a local run on a 2-core machine, against 1 thread per worker
    extract(tiny_backbone, images, tmp_path / "local.safetensors")
    extract(tiny_backbone, images, tmp_path / "ray.safetensors", backend=TWO)
    assert (tmp_path / "ray.safetensors").read_bytes() == (
        tmp_path / "local.safetensors"
    ).read_bytes()


def test_killed_worker_is_replaced_and_its_chunk_redone(
    tiny_backbone, images, tmp_path: Path, monkeypatch
) -> None:
    extract(tiny_backbone, images, tmp_path / "local.safetensors")
    marker = tmp_path / "killed-once"
    monkeypatch.setattr(extract_mod, "ChunkEncoder", encoder_that("kill", 1, marker))
    summary = extract(tiny_backbone, images, tmp_path / "ray.safetensors", backend=TWO)
    assert marker.exists()  # a worker really was killed, holding chunk 1
    shards = summary["shards"]
    assert (shards["done"], shards["retried"], shards["retries"], shards["failed"]) == (4, 1, 1, 0)
    assert (tmp_path / "ray.safetensors").read_bytes() == (
        tmp_path / "local.safetensors"
    ).read_bytes()


def test_failing_chunk_keeps_the_others_and_a_rerun_only_redoes_it(
    tiny_backbone, images, tmp_path: Path, monkeypatch
) -> None:
    extract(tiny_backbone, images, tmp_path / "local.safetensors")
    out = tmp_path / "ray.safetensors"
    parts = Path(f"{out}.parts")
    with monkeypatch.context() as m:
        m.setattr(extract_mod, "ChunkEncoder", encoder_that("raise", 2, tmp_path / "x"))
        with pytest.raises(
            RattaInputError,
            match=r"^1 of 4 shards failed \(shard 2: OSError: the disk went away\); the "
            rf"finished ones are kept in {parts}: rerun",
        ):
            extract(tiny_backbone, images, out, backend=RayBackend(workers=2, max_retries=1))
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir()) == [  # whole chunks only, nothing partial
        "chunk-000000.safetensors",
        "chunk-000001.safetensors",
        "chunk-000003.safetensors",
        "settings.json",
    ]
    summary = extract(tiny_backbone, images, out, backend=TWO)
    shards = summary["shards"]
    assert (shards["done"], shards["skipped"], summary["resumed_chunks"]) == (1, 3, 3)
    assert out.read_bytes() == (tmp_path / "local.safetensors").read_bytes()


def test_rerun_after_every_chunk_finished_encodes_nothing(
    tiny_backbone, images, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "f.safetensors"
    real = extract_mod._write_chunk
    written: list[Path] = []

    def interrupted_after_the_last(path, *args):
        real(path, *args)
        written.append(path)
        if len(written) == 4:
            raise KeyboardInterrupt  # killed before the final file is assembled

    monkeypatch.setattr(extract_mod, "_write_chunk", interrupted_after_the_last)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_backbone, images, out, backend=TWO)
    monkeypatch.undo()
    monkeypatch.setattr(extract_mod, "ChunkEncoder", None)  # a Ray job would fail to build
    summary = extract(tiny_backbone, images, out, backend=TWO)
    shards = summary["shards"]
    assert (shards["done"], shards["skipped"], summary["timings_s"]["encode"]) == (0, 4, 0.0)
    assert "4 skipped (finished earlier)" in shards["summary"]
    assert load_file(str(out))["image"].shape == (11, 32)


def test_a_local_run_resumes_on_ray_to_the_same_bytes(
    tiny_backbone, images, tmp_path: Path, monkeypatch
) -> None:
    extract(tiny_backbone, images, tmp_path / "whole.safetensors")
    out = tmp_path / "f.safetensors"
    real = extract_mod._write_chunk
    calls = {"n": 0}

    def dies_after_two(*args):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        real(*args)

    monkeypatch.setattr(extract_mod, "_write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_backbone, images, out)
    monkeypatch.undo()
    summary = extract(tiny_backbone, images, out, backend=TWO)
    assert (summary["shards"]["skipped"], summary["shards"]["done"]) == (2, 2)
    assert out.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


# ------------------------------------------------------------------------------ db build


def build_args(tiny_clip, sources: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        "db",
        "build",
        "--images",
        *map(str, sources),
        "--out",
        str(out),
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
        "--chunk-size",
        "2",
        "--quiet",
        *extra,
    ]


def image_sources(tmp_path: Path) -> list[Path]:
    """A folder (with a caption and a corrupt file) and a webdataset tar."""
    write_images(tmp_path / "folder", 5, seed=1)
    (tmp_path / "folder" / "img001.txt").write_text("a red square")
    (tmp_path / "folder" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, p in enumerate(write_images(tmp_path / "tar-src", 4, seed=2)):
            tf.add(p, arcname=f"part/{i:06d}.{p.suffix[1:]}")
    return [tmp_path / "folder", tar_path]


def same_database(a: Path, b: Path) -> None:
    ma, mb = Database(a).manifest, Database(b).manifest
    assert ma.shards == mb.shards and ma.metadata == mb.metadata  # the files' sha256
    assert ma.count == mb.count == 9
    assert pq.read_table(a / "metadata.parquet").equals(pq.read_table(b / "metadata.parquet"))


def test_db_build_on_ray_survives_a_killed_worker_and_equals_local(
    tiny_clip, tmp_path: Path, monkeypatch, capsys
) -> None:
    sources = image_sources(tmp_path)
    assert main(build_args(tiny_clip, sources, tmp_path / "local", "--workers", "0")) == 0
    marker = tmp_path / "killed-once"
    monkeypatch.setattr(extract_mod, "ChunkEncoder", encoder_that("kill", 2, marker))
    capsys.readouterr()
    argv = build_args(tiny_clip, sources, tmp_path / "ray", "--backend", "ray", "--workers", "2")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert marker.exists()
    assert (
        "shards: ray, 2 workers: 5 shards, 5 done, 0 skipped (finished earlier), 1 retried" in out
    )
    same_database(tmp_path / "local", tmp_path / "ray")


def test_db_build_rerun_on_ray_skips_the_finished_chunks(
    tiny_backbone, tmp_path: Path, monkeypatch
) -> None:
    sources = image_sources(tmp_path)
    build_database(sources, tiny_backbone, tmp_path / "local", workers=0, chunk_size=2)
    real = extract_mod._write_chunk
    calls = {"n": 0}

    def dies_after_three(*args):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        real(*args)

    monkeypatch.setattr(extract_mod, "_write_chunk", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_database(sources, tiny_backbone, tmp_path / "ray", chunk_size=2, backend=TWO)
    monkeypatch.undo()
    _, summary = build_database(sources, tiny_backbone, tmp_path / "ray", chunk_size=2, backend=TWO)
    assert (summary["shards"]["skipped"], summary["shards"]["done"]) == (3, 2)
    same_database(tmp_path / "local", tmp_path / "ray")


# ------------------------------------------------------------------------------ select


def test_select_by_caption_on_ray_equals_local(tmp_path: Path) -> None:
    from test_db import CLASSES, caption_corpus

    corpus, _ = caption_corpus(tmp_path / "laion", shards=4, rows=40)
    # the last shard repeats rows of the first: deduplication runs in corpus order
    for kind in ("img_emb", "metadata"):
        ext = "npy" if kind == "img_emb" else "parquet"
        src = corpus / kind / f"{kind}_0.{ext}"
        (corpus / kind / f"{kind}_4.{ext}").write_bytes(src.read_bytes())
    synonyms = [[], [], ["Panthera tigris"], []]
    local = select_by_caption([corpus], CLASSES, tmp_path / "local", synonyms=synonyms)
    on_ray = select_by_caption([corpus], CLASSES, tmp_path / "ray", synonyms=synonyms, backend=TWO)
    assert on_ray.shards == local.shards and on_ray.metadata == local.metadata
    assert on_ray.provenance["selection"] == local.provenance["selection"]
    assert sum(local.provenance["selection"]["duplicates_dropped"].values()) > 0
    assert not Path(f"{tmp_path / 'ray'}.parts").exists()


def test_select_by_knn_on_ray_equals_local(tmp_path: Path) -> None:
    from test_db import caption_corpus, unit

    corpus, _ = caption_corpus(tmp_path / "laion", shards=3, rows=50, seed=3)
    queries = unit(np.random.default_rng(4).standard_normal((5, 16))).astype(np.float32)
    owner = np.array([0, 0, 1, 2, 2])
    local = select_by_knn([corpus], queries, owner, list("abc"), tmp_path / "local", k=30)
    on_ray = select_by_knn(
        [corpus], queries, owner, list("abc"), tmp_path / "ray", k=30, backend=TWO
    )
    assert on_ray.shards == local.shards and on_ray.metadata == local.metadata
    assert on_ray.provenance["selection"] == local.provenance["selection"]


def test_select_cli_on_ray(tmp_path: Path, capsys) -> None:
    from test_db import CLASSES, caption_corpus

    corpus, _ = caption_corpus(tmp_path / "laion", shards=2, rows=30)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    argv = ["db", "select", "--corpus", str(corpus), "--classes", str(classes), "--by", "caption"]
    assert main([*argv, "--out", str(tmp_path / "local"), "--quiet"]) == 0
    ray_argv = [*argv, "--out", str(tmp_path / "ray"), "--quiet", "--backend", "ray"]
    capsys.readouterr()
    assert main([*ray_argv, "--workers", "2"]) == 0
    assert "shards: ray, 2 workers: 2 shards, 2 done" in capsys.readouterr().out
    assert (
        Database(tmp_path / "ray").manifest.shards == Database(tmp_path / "local").manifest.shards
    )


# ------------------------------------------------------------------------------ adapt


@pytest.mark.parametrize("save_retrieved", [False, True])
def test_adapt_on_ray_equals_local(
    world: SyntheticWorld, world_files, tmp_path: Path, save_retrieved: bool
) -> None:
    args = (world_files["features"], world_files["text"], world_files["db"])
    adapt(*args, tmp_path / "local.safetensors", batch_size=16, save_retrieved=save_retrieved)
    summary = adapt(
        *args,
        tmp_path / "ray.safetensors",
        batch_size=16,
        backend=TWO,
        save_retrieved=save_retrieved,
    )
    local, on_ray = (
        load_file(str(tmp_path / "local.safetensors")),
        load_file(str(tmp_path / "ray.safetensors")),
    )
    assert local.keys() == on_ray.keys()
    assert ("retrieved" in local) == save_retrieved
    for key in local:
        torch.testing.assert_close(on_ray[key], local[key], atol=1e-6, rtol=0, equal_nan=True)
    assert torch.equal(on_ray["candidates"], local["candidates"])
    assert (summary["shards"]["shards"], summary["shards"]["done"]) == (4, 4)  # 60 images / 16
    assert summary["counts"]["images"] == world.labels.shape[0]
    assert not Path(f"{tmp_path / 'ray.safetensors'}.parts").exists()


def test_run_cli_on_ray_equals_local(tiny_clip, tmp_path: Path, capsys) -> None:
    """``ratta run --backend ray``: extraction and adaptation on workers, same cached files."""
    make_coop_dtd(tmp_path / "data")
    desc = tmp_path / "cupl.json"
    desc.write_text(
        json.dumps(
            {n.replace("_", " "): [f"A {n} texture, {i}." for i in range(8)] for n in DTD_CLASSES}
        )
    )
    db = tmp_path / "db.npy"
    vecs = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    np.save(db, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    argv = ["run", "--dataset", "dtd", "--data-root", str(tmp_path / "data"), "--db", str(db)]
    argv += ["--descriptions", str(desc), "--views", "3", "--quiet"]
    argv += [
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
    ]
    local = [*argv, "--workers", "0", "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "l")]
    assert main(local) == 0
    ray_run = [*argv, "--backend", "ray", "--workers", "2", "--adapt-batch-size", "4"]
    ray_run += ["--cache", str(tmp_path / "c2")]
    capsys.readouterr()
    assert main([*ray_run, "--out", str(tmp_path / "r")]) == 0
    assert "shards: ray, 2 workers:" in capsys.readouterr().out
    res = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("l", "r")}
    feats = [Path(res[k]["cache"]["features"]).read_bytes() for k in ("l", "r")]
    assert feats[0] == feats[1]
    assert res["r"]["shards"]["backend"] == "ray" and res["r"]["shards"]["failed"] == 0
    a, b = (load_file(str(tmp_path / k / "predictions.safetensors")) for k in ("l", "r"))
    assert res["l"]["counts"]["adapted"] > 0 and res["r"]["counts"] == res["l"]["counts"]
    assert torch.equal(a["candidates"], b["candidates"])
    torch.testing.assert_close(a["final"], b["final"], rtol=0, atol=1e-6)


def test_eval_cli_on_ray_gives_the_local_table(tiny_clip, tmp_path: Path, capsys) -> None:
    make_coop_dtd(tmp_path / "data")
    (tmp_path / "desc").mkdir()
    (tmp_path / "desc" / "CuPL_prompts_dtd.json").write_text(
        json.dumps(
            {n.replace("_", " "): [f"A {n} texture, {i}." for i in range(8)] for n in DTD_CLASSES}
        )
    )
    (tmp_path / "dbs").mkdir()
    vecs = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    np.save(tmp_path / "dbs" / "dtd.npy", vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    argv = ["eval", "--datasets", "dtd", "--seeds", "0", "--data-root", str(tmp_path / "data")]
    argv += ["--db-root", str(tmp_path / "dbs"), "--descriptions", str(tmp_path / "desc")]
    argv += ["--views", "3", "--quiet", "--model-config", str(tiny_clip["config"])]
    argv += ["--pretrained", str(tiny_clip["checkpoint"])]
    assert main([*argv, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "l")]) == 0
    ray_argv = [*argv, "--backend", "ray", "--workers", "2", "--cache", str(tmp_path / "c2")]
    assert main([*ray_argv, "--out", str(tmp_path / "r")]) == 0
    rows = {k: json.loads((tmp_path / k / "results.json").read_text())["rows"] for k in "lr"}
    keys = ("dataset", "seed", "method", "images", "top1", "top5", "fallback_rate")
    assert [{k: r[k] for k in keys} for r in rows["r"]] == [
        {k: r[k] for k in keys} for r in rows["l"]
    ]
    for a, b in zip(rows["l"], rows["r"], strict=True):
        assert abs(a["ece"] - b["ece"]) < 1e-5


def test_bad_input_found_by_a_worker_stops_the_run_with_the_local_message(
    world: SyntheticWorld, tmp_path: Path
) -> None:
    files = world.write(tmp_path / "in", dtype=torch.float32)
    image = world.image.clone()
    image[37, 3] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file({"image": image, "views": world.views, "labels": world.labels}, str(bad))
    args = (bad, files["text"], files["db"])
    with pytest.raises(RattaInputError) as local:
        adapt(*args, tmp_path / "local.safetensors", batch_size=16)
    with pytest.raises(RattaInputError) as on_ray:
        adapt(*args, tmp_path / "ray.safetensors", batch_size=16, backend=TWO)
    assert str(on_ray.value) == str(local.value) and "NaN" in str(local.value)
    assert not (tmp_path / "ray.safetensors").exists()


def test_adapt_cli_on_ray_prints_the_shards(world_files, tmp_path: Path, capsys) -> None:
    argv = adapt_args(world_files, tmp_path / "p.safetensors")
    assert main([*argv, "--batch-size", "32", "--backend", "ray"]) == 0
    assert "shards: ray, 1 worker: 2 shards, 2 done" in capsys.readouterr().out


# ------------------------------------------------------------------------------ errors


def test_a_worker_that_cannot_start_stops_the_run_in_one_line() -> None:
    class Broken:
        def setup(self, device: str) -> None:
            raise ValueError("weights missing on this node")

        def __call__(self, shard: int) -> int:
            return shard

    seen: list[int] = []
    with pytest.raises(
        RattaInputError,
        match=r"^a Ray worker could not start: ValueError: weights missing on this node$",
    ):
        run_shards(Broken(), [(0, 0), (1, 1)], lambda k, _: seen.append(k), TWO, total=2)
    assert seen == []


def test_ray_flags_without_the_ray_backend_are_one_line(world_files, tmp_path, capsys) -> None:
    argv = adapt_args(world_files, tmp_path / "p.safetensors")
    assert main([*argv, "--num-gpus-per-worker", "1"]) == 2
    assert capsys.readouterr().err == (
        "ratta: error: --num-gpus-per-worker applies to --backend ray (add --backend ray)\n"
    )
    assert main([*argv, "--backend", "ray", "--device", "cuda"]) == 2
    assert "reserve GPUs for the Ray workers with --num-gpus-per-worker" in capsys.readouterr().err


def run_cli(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_unreachable_address_and_missing_ray_are_one_line(world_files, tmp_path) -> None:
    argv = [*adapt_args(world_files, tmp_path / "p.safetensors"), "--backend", "ray"]
    closed = json.dumps([*argv, "--ray-address", "127.0.0.1:9"])
    res = run_cli(f"import sys; from ratta.cli import main; sys.exit(main({closed}))")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(
        "ratta: error: --ray-address 127.0.0.1:9: cannot reach a Ray head node there"
    )
    assert len(res.stderr.strip().splitlines()) == 1
    no_ray = f"import sys; sys.modules['ray'] = None; from ratta.cli import main; sys.exit(main({json.dumps(argv)}))"  # noqa: E501
    res = run_cli(no_ray)
    assert res.returncode == 2 and res.stderr == (
        "ratta: error: --backend ray needs Ray, which is not installed: pip install 'ratta[ray]'\n"
    )
    assert not (tmp_path / "p.safetensors").exists()


def test_the_local_backend_never_imports_ray(world_files, tmp_path) -> None:
    argv = adapt_args(world_files, tmp_path / "p.safetensors")
    code = (
        f"import sys; from ratta.cli import main; code = main({json.dumps(argv)}); "
        "import ratta.extract, ratta.db.build, ratta.db.select, ratta.cli.db; "
        "sys.exit(code or ('ray' in sys.modules) * 7)"
    )
    res = run_cli(code)
    assert res.returncode == 0, res.stderr
