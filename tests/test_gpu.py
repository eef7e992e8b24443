"""GPU readiness on a machine without a GPU: adapt, extract, text and the Ray jobs run with
``device="cuda"`` on a simulated device (tests/simcuda.py), which raises on device mixing
and counts host synchronisations, copies, float atomics and TF32 use."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapt_args, write_images
from safetensors.torch import load_file
from simcuda import SimulatedCuda

import ratta.files.database
import ratta.retrieval
from ratta import RATTAConfig, ratta_batch
from ratta.adapt import RangeAdapter, adapt, output_keys
from ratta.backbones import load_backbone
from ratta.cli import main
from ratta.db.importers import import_database
from ratta.db.index import IndexSettings, reindex
from ratta.db.search import DEVICE_WORKSPACE
from ratta.devices import DeviceFallbackWarning, read_ahead, resolve_device
from ratta.engine import Blocking
from ratta.errors import RattaInputError
from ratta.extract import Chunk, ChunkEncoder, ExtractSettings, extract_features
from ratta.retrieval import ExactRetriever, faiss_to_device
from ratta.sinkhorn import sinkhorn_knopp
from ratta.synthetic import SyntheticWorld
from ratta.text import build_text_features

# Host waits of one adapted batch: the number of candidate sets, Sinkhorn's looks (one per
# ot_sync_every of its at most 100 iterations), the outputs' copy back.
SYNCS_PER_BATCH = (
    1
    + math.ceil(RATTAConfig().ot_max_iter / Blocking.for_device(torch.device("cuda")).ot_sync_every)
    + 1
)


@pytest.fixture()
def files16(world: SyntheticWorld, tmp_path: Path) -> dict[str, Path]:
    """The world's files as the paper stores them: float16 features and database."""
    return world.write(tmp_path / "in", dtype=torch.float16)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a
    )


def outputs(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def adapt_on(gpu: SimulatedCuda, files: dict[str, Path], out: Path, **kwargs) -> dict:
    with gpu:
        return adapt(files["features"], files["text"], files["db"], out, device="cuda", **kwargs)


@pytest.mark.parametrize(
    ("search", "placement"), [("exact", "device"), ("exact", "streamed"), ("faiss", "auto")]
)
def test_adapt_on_a_gpu_gives_the_cpu_outputs(files16, tmp_path, search, placement) -> None:
    """Same outputs, bit for bit (the simulated device computes on the CPU): the GPU code
    paths (no pruning, Sinkhorn's looks, float16 rows widened per block, streaming, rows
    read by id) change how the work is cut, never the result, the retrieved rows included."""
    cpu = adapt(
        files16["features"],
        files16["text"],
        files16["db"],
        tmp_path / "c",
        batch_size=20,
        save_retrieved=True,
    )
    gpu = SimulatedCuda()
    with pytest.warns(DeviceFallbackWarning) if search == "faiss" else contextlib.nullcontext():
        summary = adapt_on(
            gpu,
            files16,
            tmp_path / "g",
            batch_size=20,
            search=search,
            db_placement=placement,
            save_retrieved=True,
        )
    assert same(outputs(tmp_path / "c"), outputs(tmp_path / "g"))
    assert "retrieved" in outputs(tmp_path / "g")
    assert summary["metrics"] == cpu["metrics"]
    assert summary["runtime"]["db_placement"] == ("host" if search == "faiss" else placement)
    assert not gpu.counts.atomics and not gpu.counts.tf32 and gpu.counts.device_matmuls
    assert gpu.live_bytes == 0  # nothing left on the device


def per_batch(files: dict[str, Path], tmp_path: Path, **kwargs) -> tuple[SimulatedCuda, ...]:
    """Two runs over the same 60 images, in 2 and in 4 batches."""
    runs = []
    for size in (30, 15):
        gpu = SimulatedCuda()
        adapt_on(gpu, files, tmp_path / f"b{size}", batch_size=size, **kwargs)
        runs.append(gpu)
    return tuple(runs)


def test_adapt_waits_for_the_device_a_few_times_per_batch(files16, tmp_path) -> None:
    two, four = per_batch(files16, tmp_path)
    extra = [len(four.counts.syncs) - len(two.counts.syncs)]
    assert 0 < extra[0] <= 2 * SYNCS_PER_BATCH, four.counts.by_site(four.counts.syncs)
    # one copy of the outputs back and one of the embeddings out, per batch
    assert len(four.counts.d2h) - len(two.counts.d2h) == 2
    batch_h2d = [e for e in four.counts.h2d if e.site.startswith("devices.py")]
    assert len(batch_h2d) == 4
    assert not any("devices.py" in e.site for e in four.counts.syncs)  # pinned, asynchronous
    # the embeddings travel as stored (float16): 60 images x 13 embeddings x 32 values x 2 B
    assert sum(e.nbytes for e in batch_h2d) == 60 * 13 * 32 * 2


def test_profile_alone_makes_the_stage_timers_wait(files16, tmp_path) -> None:
    quiet, profiled = SimulatedCuda(), SimulatedCuda()
    adapt_on(quiet, files16, tmp_path / "q", batch_size=20)
    summary = adapt_on(profiled, files16, tmp_path / "p", batch_size=20, profile=True)
    waits = [e for e in profiled.counts.syncs if e.what == "torch.cuda.synchronize"]
    assert not [e for e in quiet.counts.syncs if e.what == "torch.cuda.synchronize"]
    assert len(waits) >= 2 * 3 * 6  # both ends of every stage of every batch
    assert summary["runtime"]["profile"] is True


def test_tf32_only_when_asked_and_the_flags_restored(files16, tmp_path) -> None:
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    plain, fast = SimulatedCuda(), SimulatedCuda()
    adapt_on(plain, files16, tmp_path / "a", batch_size=30)
    summary = adapt_on(fast, files16, tmp_path / "b", batch_size=30, tf32=True)
    assert not plain.counts.tf32 and fast.counts.tf32
    assert summary["runtime"]["compute"]["tf32"] is True
    after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    assert after == before


def _big_database(tmp_path: Path, rows: int, dim: int = 32) -> Path:
    vecs = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    path = tmp_path / "big.npy"
    np.save(path, (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16))
    return path


def test_the_database_stays_float16_on_the_device(files16, tmp_path, monkeypatch) -> None:
    rows = 40_000
    files16 = {**files16, "db": _big_database(tmp_path, rows)}
    monkeypatch.setattr(ratta.retrieval, "_DEVICE_SCAN_ROWS", (256, 1024))
    monkeypatch.setattr(ratta.files.database, "CHECK_ROWS", 4096)
    gpu = SimulatedCuda()
    summary = adapt_on(gpu, files16, tmp_path / "o", batch_size=30)
    stored, wide = rows * 32 * 2, rows * 32 * 4
    assert summary["runtime"]["db_placement"] == "device"
    assert summary["runtime"]["db_device_bytes"] == stored + rows * 4  # rows + float32 norms
    assert gpu.largest == stored  # never a float32 copy of the whole database
    assert gpu.peak < stored + wide // 2


def test_a_database_larger_than_free_memory_is_streamed(files16, tmp_path, monkeypatch) -> None:
    rows = 40_000
    files16 = {**files16, "db": _big_database(tmp_path, rows)}
    stored = rows * 32 * 2
    monkeypatch.setattr(ratta.retrieval, "STREAM_ROWS", 4096)
    monkeypatch.setattr(ratta.retrieval, "_DEVICE_SCAN_ROWS", (256, 1024))
    monkeypatch.setattr(ratta.files.database, "CHECK_ROWS", 4096)
    cpu = adapt(files16["features"], files16["text"], files16["db"], tmp_path / "c")
    gpu = SimulatedCuda(memory=DEVICE_WORKSPACE + stored)  # no room next to the workspace
    summary = adapt_on(gpu, files16, tmp_path / "g", batch_size=30)
    assert summary["runtime"]["db_placement"] == "streamed"
    assert same(outputs(tmp_path / "c"), outputs(tmp_path / "g"))
    assert summary["metrics"] == cpu["metrics"]
    assert gpu.peak < stored  # the rows never all on the device at once
    streamed = [e for e in gpu.counts.h2d if e.site.startswith("retrieval.py")]
    assert sum(e.nbytes for e in streamed) >= 2 * stored  # every search (2 batches) streams all
    waits = [e for e in gpu.counts.syncs if e.what == "Event.synchronize"]
    assert len(waits) <= 2 * math.ceil(rows / 4096)  # one wait per staging buffer reuse
    with pytest.raises(RattaInputError, match="--db-placement device: the database needs"):
        adapt_on(SimulatedCuda(memory=stored), files16, tmp_path / "x", db_placement="device")
    assert not (tmp_path / "x").exists()


def test_faiss_without_gpu_support_says_so_once(files16, tmp_path) -> None:
    with pytest.warns(DeviceFallbackWarning, match="faiss-cpu") as caught:
        summary = adapt_on(SimulatedCuda(), files16, tmp_path / "o", search="faiss")
    assert len([w for w in caught if w.category is DeviceFallbackWarning]) == 1
    assert summary["runtime"]["faiss_device"] == "cpu"
    assert "faiss-cpu" in summary["runtime"]["faiss_fallback"]


@pytest.fixture()
def gpu_faiss(monkeypatch):
    """FAISS with GPU support, simulated: moving an index records the GPU it goes to."""
    import faiss

    moved: list[int] = []

    def to_gpu(_resources, gpu, index):
        if isinstance(index, faiss.IndexHNSW):
            raise RuntimeError("Error in index_cpu_to_gpu: not implemented for this type")
        moved.append(gpu)
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    return moved


def test_gpu_faiss_searches_on_the_requested_gpu_only(files16, tmp_path, gpu_faiss) -> None:
    summary = adapt_on(SimulatedCuda(devices=2), files16, tmp_path / "o", search="faiss")
    assert gpu_faiss == [0]
    with SimulatedCuda(devices=2):
        summary = adapt(
            files16["features"],
            files16["text"],
            files16["db"],
            tmp_path / "o1",
            device="cuda:1",
            search="faiss",
        )
    assert gpu_faiss == [0, 1]
    assert summary["runtime"]["faiss_device"] == "cuda:1"
    assert summary["runtime"]["faiss_fallback"] is None


def test_k_s_above_the_gpu_limit_is_refused_before_loading(files16, tmp_path, gpu_faiss) -> None:
    with pytest.raises(RattaInputError, match="at most 2048 neighbours"):
        adapt_on(
            SimulatedCuda(), files16, tmp_path / "o", search="faiss", config=RATTAConfig(k_s=4096)
        )
    assert gpu_faiss == [] and not (tmp_path / "o").exists()


def test_an_index_without_a_gpu_version_stays_on_the_cpu(gpu_faiss) -> None:
    import faiss

    index = faiss.IndexHNSWFlat(8, 16)
    with SimulatedCuda():
        kept, reason = faiss_to_device(index, torch.device("cuda"))
    assert kept is index and "IndexHNSWFlat" in reason and "not implemented" in reason


def test_device_strings_are_checked_up_front(files16, tmp_path, capsys) -> None:
    with SimulatedCuda(devices=1):
        with pytest.raises(
            RattaInputError, match=r"cuda:3: this machine has 1 CUDA device \(cuda:0\)"
        ):
            resolve_device("cuda:3")
        code = main(adapt_args(files16, tmp_path / "o", "--device", "cuda:3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "ratta: error: --device cuda:3: this machine has 1 CUDA device (cuda:0)"
    ]
    assert not (tmp_path / "o").exists()
    with pytest.raises(RattaInputError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RattaInputError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("save_retrieved", [False, True])
def test_the_ray_adaptation_job_on_a_gpu(files16, tmp_path, save_retrieved) -> None:
    job = RangeAdapter(
        files16["features"],
        files16["text"],
        files16["db"],
        RATTAConfig(),
        dtype="float32",
        search="exact",
        views=None,
        save_retrieved=save_retrieved,
    )
    job.setup("cpu")
    expected = job((10, 30))["outputs"]
    gpu = SimulatedCuda()
    with gpu:
        job.setup("cuda")
        loaded = len(gpu.counts.d2h)
        result = job((10, 30))
    assert same(result["outputs"], expected)
    assert all(not gpu.on_device(t) for t in result["outputs"].values())
    assert len(gpu.counts.d2h) - loaded == 1  # the outputs, in one copy
    assert set(result["outputs"]) == set(output_keys(save_retrieved))


def test_sinkhorn_looks_change_nothing_but_the_waits() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 13, generator=g)
    b = torch.rand(40, 20, generator=g)
    cost = torch.rand(40, 13, 20, generator=g)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    ref = sinkhorn_knopp(a, b, cost, 0.05, 100, 1e-4, sync_every=1)
    for every in (10, 20, 1000):
        gpu = SimulatedCuda()
        with gpu:
            plan, iters = sinkhorn_knopp(
                a.cuda(), b.cuda(), cost.cuda(), 0.05, 100, 1e-4, sync_every=every
            )
        assert torch.equal(plan.cpu(), ref[0]) and torch.equal(iters.cpu(), ref[1])
        looks = [e for e in gpu.counts.syncs if e.what == "nonzero"]
        assert len(looks) <= math.ceil(100 / every)


def test_a_batch_waits_once_for_its_candidate_sets(world) -> None:
    from conftest import stacked

    t = world.text
    gpu = SimulatedCuda()
    with gpu:
        args = [stacked(world), t.classifier, t.desc, t.desc_class]
        args = [a.cuda() for a in args]
        retriever = ExactRetriever(torch.from_numpy(world.database).cuda())
        before = (len(gpu.counts.syncs), len(gpu.counts.d2h))
        blocking = Blocking(prune=False, ot_sync_every=1000)
        ratta_batch(*args, t.logit_scale, retriever, RATTAConfig(), blocking=blocking)
    # the number of candidate sets, and Sinkhorn's first look (after its first check)
    assert [e.site.split(":")[0] for e in gpu.counts.syncs[before[0] :]] == [
        "engine.py",
        "sinkhorn.py",
    ]
    assert len(gpu.counts.d2h) == before[1] and not gpu.counts.atomics


def test_read_ahead_keeps_order_and_raises_in_place() -> None:
    assert list(read_ahead(range(5), lambda i: i * i)) == [0, 1, 4, 9, 16]

    def fails_at_3(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in read_ahead(range(6), fails_at_3):
            seen.append(value)
    assert seen == [0, 1, 2]
    reads = []
    it = read_ahead(range(100), reads.append)
    next(it)
    it.close()  # the reading thread stops instead of reading all 100
    assert len(reads) < 5


@pytest.fixture()
def cuda_backbone(tiny_clip):
    """A factory of the tiny model on the simulated device (load it inside the simulation)."""
    from ratta.backbones import BackboneSpec

    def make(precision: str = "fp32"):
        spec = BackboneSpec(
            model=None,
            pretrained=str(tiny_clip["checkpoint"]),
            model_config=str(tiny_clip["config"]),
            precision=precision,
        )
        return load_backbone(spec, "cuda")

    return make


def test_extract_on_a_gpu(tmp_path, tiny_backbone, cuda_backbone) -> None:
    paths = write_images(tmp_path / "img", 6)
    settings = ExtractSettings(views=3)
    kw = {"workers": 0, "chunk_size": 4, "forward_batch": 8}
    extract_features(paths, None, tiny_backbone, tmp_path / "c.safetensors", settings, **kw)
    gpu = SimulatedCuda()
    with gpu:
        backbone = cuda_backbone("fp16")
        loaded = (len(gpu.counts.syncs), len(gpu.counts.d2h))
        summary = extract_features(
            paths, None, backbone, tmp_path / "g.safetensors", settings, **kw
        )
    groups = 3  # 2 images (8 crops) per forward, 6 images
    assert len(gpu.counts.d2h) - loaded[1] == groups  # features come back once per group
    pixels = [e for e in gpu.counts.h2d if e.site.startswith("extract.py")]
    assert len(pixels) == groups and sum(e.nbytes for e in pixels) == 6 * 4 * 3 * 32 * 32
    waits = gpu.counts.syncs[loaded[0] :]
    assert not [e for e in waits if e.site.startswith("extract.py") and "h2d" in e.what]
    assert len(waits) <= groups + 2  # the copies back, the pixel statistics once
    assert not gpu.counts.tf32 and not gpu.counts.atomics
    assert summary["compute"] == {
        "device": "cuda",
        "device_name": "Simulated GPU",
        "precision": "fp16",
        "tf32": False,
    }
    cpu_feats, gpu_feats = outputs(tmp_path / "c.safetensors"), outputs(tmp_path / "g.safetensors")
    assert torch.allclose(cpu_feats["views"].float(), gpu_feats["views"].float(), atol=2e-3)


def test_tf32_is_part_of_the_identity_on_cuda_only(tiny_clip, tmp_path, cuda_backbone) -> None:
    from ratta.backbones import BackboneSpec, backbone_fingerprint

    spec = BackboneSpec(
        model=None,
        pretrained=str(tiny_clip["checkpoint"]),
        model_config=str(tiny_clip["config"]),
    )
    assert backbone_fingerprint(spec, "cuda", tf32=True)["tf32"] is True
    assert "tf32" not in backbone_fingerprint(spec, "cuda")
    assert "tf32" not in backbone_fingerprint(spec, "cpu", tf32=True)  # no TF32 on a CPU
    paths = write_images(tmp_path / "img", 2)
    with SimulatedCuda():
        backbone = cuda_backbone()
        extract_features(paths, None, backbone, tmp_path / "f.safetensors", tf32=True, workers=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        identity = json.loads(f.metadata()["ratta_features"])
    assert identity["backbone"] == backbone_fingerprint(spec, "cuda", tf32=True) | {
        "preprocessing": identity["backbone"]["preprocessing"]
    }


def test_the_ray_extraction_job_on_a_gpu(tmp_path, tiny_backbone) -> None:
    paths = write_images(tmp_path / "img", 4)
    job = ChunkEncoder(tiny_backbone, ExtractSettings(views=3), forward_batch=8, workers=0)
    gpu = SimulatedCuda()
    with gpu:
        job.setup("cuda")
        encoded = job(Chunk(0, 0, paths))
    assert encoded.features.shape == (4, 4, 32) and not gpu.on_device(encoded.features)
    assert not gpu.counts.tf32 and len(gpu.counts.d2h) == 2  # 2 groups of 2 images


def test_text_on_a_gpu(tmp_path, cuda_backbone) -> None:
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"cat": ["a small animal.", "whiskers."], "dog": ["barks."]}))
    gpu = SimulatedCuda()
    with gpu:
        backbone = cuda_backbone()
        summary = build_text_features(
            ["cat", "dog"],
            desc,
            ["a photo of a {}."],
            "A photo of a {}, ",
            backbone,
            tmp_path / "t.safetensors",
        )
    assert summary["compute"]["device"] == "cuda" and summary["compute"]["precision"] == "fp32"
    assert not gpu.counts.tf32 and gpu.counts.device_matmuls


def test_an_index_database_reads_only_retrieved_rows_on_a_gpu(files16, tmp_path) -> None:
    folder = tmp_path / "dbdir"
    import_database([files16["db"]], folder, shard_rows=128)
    reindex(folder, IndexSettings("IVF4,Flat", search_params="nprobe=4"))
    gpu = SimulatedCuda()
    with pytest.warns(DeviceFallbackWarning):
        summary = adapt_on(gpu, {**files16, "db": folder}, tmp_path / "o", search="index")
    assert summary["runtime"]["db_placement"] == "host"
    assert summary["runtime"]["db_device_bytes"] == 0
    sets = round(summary["counts"]["mean_candidates"] * 60)
    rows = [
        e for e in gpu.counts.h2d if e.site.startswith("devices.py") and e.nbytes != 60 * 13 * 64
    ]
    # K_S = 20 rows of 32 float16 values per candidate set, nothing else of the database
    assert sum(e.nbytes for e in rows) == sets * 20 * 32 * 2


def test_the_cli_flags_reach_the_summary(files16, tmp_path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    extra = ("--tf32", "--profile", "--db-placement", "streamed")
    assert main(adapt_args(files16, out, *extra)) == 0
    runtime = json.loads(Path(f"{out}.json").read_text())["runtime"]
    assert runtime["db_placement"] == "streamed" and runtime["profile"] is True
    assert runtime["compute"]["tf32"] is False  # TF32 exists on CUDA only
    code = main(
        adapt_args(files16, tmp_path / "x", "--search", "faiss", "--db-placement", "device")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "only --search exact places rows" in err[0]
