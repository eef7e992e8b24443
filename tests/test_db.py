"""Image databases: directory format, import (safe pickles), build, select, index, audit."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import adapt_args, reference_pickle, write_clip_corpus, write_images
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from ratta.adapt import adapt
from ratta.backbones import BackboneSpec, load_backbone
from ratta.cli import main
from ratta.db import Database, inspect_database, load_for_search
from ratta.db.audit import find_duplicates, write_clean
from ratta.db.build import build_database
from ratta.db.importers import import_database
from ratta.db.index import IndexSettings, reindex
from ratta.db.select import select_by_caption, select_by_knn
from ratta.errors import RattaInputError
from ratta.files import RattaInputWarning, load_database, save_database
from ratta.synthetic import SyntheticWorld

# ------------------------------------------------------------------------------ helpers


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class RunsCommand:
    """Pickles to a call of os.system: unpickling it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def metadata(path: Path) -> pa.Table:
    return pq.read_table(Path(path) / "metadata.parquet")


# ------------------------------------------------------------------------------ import


def test_reference_pickle_gives_the_same_predictions_as_npy(
    world: SyntheticWorld, tmp_path: Path
) -> None:
    files = world.write(tmp_path / "in", dtype=torch.float16)
    array = np.load(files["db"])
    pkl = reference_pickle(tmp_path / "LAION2B_dtd_aux_ViT-B_16", array)
    manifest = import_database([pkl], tmp_path / "db", shard_rows=128)
    assert [s.rows for s in manifest.shards] == [128, 128, 128, array.shape[0] - 384]
    assert manifest.dtype == "float16" and manifest.count == array.shape[0]
    assert manifest.provenance["sources"][0]["format"] == "pickle"
    emb, sq, index = load_for_search(tmp_path / "db")
    ref, ref_sq = load_database(files["db"])
    assert index is None and torch.equal(emb, ref) and torch.equal(sq, ref_sq)

    adapt(files["features"], files["text"], files["db"], tmp_path / "a.safetensors")
    adapt(files["features"], files["text"], tmp_path / "db", tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(a["final"], b["final"])


@pytest.mark.parametrize("protocol", [2, 5])
def test_old_and_new_pickle_protocols_are_read(tmp_path: Path, protocol: int) -> None:
    array = unit(np.random.default_rng(0).standard_normal((50, 8))).astype(np.float32)
    pkl = reference_pickle(tmp_path / "ref.pkl", array, protocol)
    import_database([pkl], tmp_path / "db")
    assert np.array_equal(np.load(tmp_path / "db" / "embeddings" / "000000.npy"), array)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "LAION2B_evil_aux_ViT-B_16"
    with open(evil, "wb") as fh:
        payload = {"embedding": np.ones((3, 4), np.float32), "x": RunsCommand(f"touch {marker}")}
        pickle.dump(payload, fh)
    code = main(["db", "import", str(evil), "--out", str(tmp_path / "db"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists() and not (tmp_path / "db").exists()
    assert len(err.splitlines()) == 1
    assert str(evil) in err and f"refused to unpickle global '{os.system.__module__}.system'" in err
    assert not list(tmp_path.glob(".db.*"))  # no temporary folder left behind


def test_pickle_without_the_key_names_the_keys(tmp_path: Path) -> None:
    with open(tmp_path / "x.pkl", "wb") as fh:
        pickle.dump({"emb": np.eye(2, 4, dtype=np.float32)}, fh)
    with pytest.raises(RattaInputError, match=r"missing key 'embedding' \(found: emb\)"):
        import_database([tmp_path / "x.pkl"], tmp_path / "db")
    import_database([tmp_path / "x.pkl"], tmp_path / "db", key="emb")


def test_npy_safetensors_and_clip_folders_import_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal((30, 16))).astype(np.float16)
    b = unit(rng.standard_normal((20, 16))).astype(np.float16)
    save_database(tmp_path / "a.npy", a)
    save_numpy({"labels": np.zeros(20, np.int64), "embedding": b}, str(tmp_path / "b.safetensors"))
    # numeric shard order: img_emb_10 comes after img_emb_2
    corpus = tmp_path / "laion"
    write_clip_corpus(corpus, [(a[:10], ["c0"] * 10, [f"u{i}" for i in range(10)])])
    os.rename(corpus / "img_emb" / "img_emb_0.npy", corpus / "img_emb" / "img_emb_10.npy")
    os.rename(
        corpus / "metadata" / "metadata_0.parquet", corpus / "metadata" / "metadata_10.parquet"
    )
    np.save(corpus / "img_emb" / "img_emb_2.npy", b[:5])
    pq.write_table(
        pa.table({"image_path": [f"p{i}" for i in range(5)], "caption": ["c2"] * 5}),
        corpus / "metadata" / "metadata_2.parquet",
    )
    manifest = import_database(
        [tmp_path / "a.npy", tmp_path / "b.safetensors", corpus], tmp_path / "db"
    )
    assert manifest.count == 65 and manifest.dimension == 16
    emb, _, _ = load_for_search(tmp_path / "db")
    expected = np.concatenate([a, b, b[:5], a[:10]]).astype(np.float32)
    assert np.array_equal(emb.numpy(), expected)
    meta = metadata(tmp_path / "db")
    assert meta.column("id").to_pylist()[:2] == ["a.npy:0", "a.npy:1"]
    assert meta.column("url").to_pylist()[50:56] == ["p0", "p1", "p2", "p3", "p4", "u0"]
    assert meta.column("caption").to_pylist()[54:56] == ["c2", "c0"]
    assert meta.column("id").to_pylist()[55] == "000000000"  # clip-retrieval 'key'
    assert meta.column("source_row").to_pylist()[55:57] == [0, 1]
    formats = [s["format"] for s in manifest.provenance["sources"]]
    assert formats == ["npy", "safetensors", "clip-retrieval"]


def test_bad_rows_stop_the_import_and_leave_nothing(tmp_path: Path) -> None:
    arr = unit(np.random.default_rng(2).standard_normal((10, 4))).astype(np.float32)
    arr[7] = np.nan
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(RattaInputError, match=r"x\.npy: embedding row 7 contains NaN or Inf$"):
        import_database([tmp_path / "x.npy"], tmp_path / "db")
    assert not (tmp_path / "db").exists() and not list(tmp_path.glob(".db.*"))


def test_rows_off_the_sphere_are_normalised_and_counted(tmp_path: Path) -> None:
    arr = unit(np.random.default_rng(3).standard_normal((10, 4))).astype(np.float32)
    arr[[2, 5]] *= 3
    np.save(tmp_path / "x.npy", arr)
    with pytest.warns(RattaInputWarning, match="2 vectors were not L2-normalised"):
        manifest = import_database([tmp_path / "x.npy"], tmp_path / "db")
    assert manifest.normalisation["renormalised_rows"] == 2
    stored = np.load(tmp_path / "db" / "embeddings" / "000000.npy")
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-6)
    assert np.array_equal(stored[0], arr[0])  # untouched rows keep their bytes


# ------------------------------------------------------------------------------ format


def test_info_verify_and_a_tampered_shard(tmp_path: Path, capsys) -> None:
    arr = unit(np.random.default_rng(4).standard_normal((40, 8))).astype(np.float16)
    np.save(tmp_path / "x.npy", arr)
    assert (
        main(
            [
                "db",
                "import",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "db"),
                "--model",
                "ViT-B-16",
                "--pretrained",
                "openai",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["db", "info", str(tmp_path / "db"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "40 x 8 float16" in out and "exact" in out and "ViT-B-16" in out
    assert "x.npy (npy, 40, hashed)" in out and "hashes: all match" in out
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["format"] == "ratta-database" and manifest["count"] == 40
    assert manifest["provenance"]["sources"][0]["sha256"]
    shard = tmp_path / "db" / "embeddings" / "000000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["db", "info", str(tmp_path / "db"), "--verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_shard_that_disagrees_with_the_manifest_is_one_line(tmp_path: Path, capsys) -> None:
    arr = unit(np.random.default_rng(5).standard_normal((40, 8))).astype(np.float16)
    np.save(tmp_path / "x.npy", arr)
    import_database([tmp_path / "x.npy"], tmp_path / "db")
    np.save(tmp_path / "db" / "embeddings" / "000000.npy", arr[:30])
    with pytest.raises(
        RattaInputError,
        match=r"000000\.npy: shard is float16 \(30, 8\) but the manifest says float16 \(40, 8\)",
    ):
        inspect_database(tmp_path / "db")


def test_adapt_checks_the_directory_dimension(world_files, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", unit(np.random.default_rng(6).standard_normal((20, 8))))
    import_database([tmp_path / "x.npy"], tmp_path / "db")
    code = main(adapt_args({**world_files, "db": tmp_path / "db"}, tmp_path / "p.safetensors"))
    err = capsys.readouterr().err
    assert code == 2 and "database embeddings have dimension 8 but the text file" in err
    code = main(adapt_args(world_files, tmp_path / "p.safetensors", "--search", "index"))
    assert code == 2 and "--search index needs a database directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ index


def test_approximate_index_is_measured_and_used_by_adapt(
    world: SyntheticWorld, world_files, tmp_path: Path
) -> None:
    import_database([world_files["db"]], tmp_path / "db")
    section = reindex(
        tmp_path / "db",
        IndexSettings(spec="IVF16,Flat", target_recall=0.99, train_rows=460),
        queries=world.text.desc.numpy(),
    )
    assert section["search_params"].startswith("nprobe=")
    assert section["recall_at_20"] >= 0.99 and section["tuning"][-1]["recall_at_20"] >= 0.99
    assert all(r["recall_at_20"] < 0.99 for r in section["tuning"][:-1])
    db = Database(tmp_path / "db")
    assert db.has_index and (tmp_path / "db" / section["file"]).is_file()
    _, _, index = load_for_search(tmp_path / "db")
    assert index.ntotal == world.database.shape[0]

    adapt(world_files["features"], world_files["text"], tmp_path / "db", tmp_path / "e.safetensors")
    approx = adapt(
        world_files["features"],
        world_files["text"],
        tmp_path / "db",
        tmp_path / "i.safetensors",
        search="index",
    )
    assert approx["runtime"]["search"] == "index"
    e = load_file(str(tmp_path / "e.safetensors"))["final"].argmax(1)
    i = load_file(str(tmp_path / "i.safetensors"))["final"].argmax(1)
    assert float((e == i).float().mean()) >= 0.95

    reindex(tmp_path / "db", IndexSettings(spec="exact"))
    assert not Database(tmp_path / "db").has_index
    assert not (tmp_path / "db" / section["file"]).exists()


def test_bad_factory_string_is_one_line(world_files, tmp_path: Path) -> None:
    import_database([world_files["db"]], tmp_path / "db")
    with pytest.raises(
        RattaInputError, match=r"--index IVF16,Nonsense: not a FAISS factory string"
    ):
        reindex(tmp_path / "db", IndexSettings(spec="IVF16,Nonsense"))


# ------------------------------------------------------------------------------ select


CLASSES = ["Boeing 737", "sea holly", "tiger", "A300-600"]
# (caption, classes it mentions under the rule, with the synonym 'panthera tigris' for tiger)
CAPTIONS = [
    ("a Boeing 737 landing at dusk", {0}),
    ("BOEING   737-800 on the apron", {0}),
    ("boeing 7370 is not a plane", set()),
    ("the Sea Holly and a tiger", {1, 2}),
    ("tigers in the wild", set()),
    ("sea hollyhock in bloom", set()),
    ("an A300-600 taking off", {3}),
    ("an a300 600 taking off", set()),
    ("Panthera tigris, sleeping", {2}),
    ("sea_holly_macro.jpg", set()),
    ("a photo of a sea holly.", {1}),
    (None, set()),
    ("", set()),
]


def caption_corpus(root: Path, shards: int, rows: int, seed: int = 0) -> tuple[Path, list]:
    """Shards of rows with captions drawn from CAPTIONS; returns the folder and the truth."""
    rng = np.random.default_rng(seed)
    truth, parts = [], []
    for s in range(shards):
        emb = unit(rng.standard_normal((rows, 16))).astype(np.float16)
        pick = rng.integers(0, len(CAPTIONS), rows)
        urls = [f"http://x/{s}/{r}.jpg" for r in range(rows)]
        parts.append((emb, [CAPTIONS[p][0] for p in pick], urls))
        truth += [(f"{s:05d}{r:04d}", CAPTIONS[p][1], emb[r]) for r, p in enumerate(pick)]
    return write_clip_corpus(root, parts), truth


def test_select_by_caption_returns_exactly_the_matching_rows(tmp_path: Path) -> None:
    corpus, truth = caption_corpus(tmp_path / "laion", shards=3, rows=40)
    # plant duplicates in the last shard: an earlier matching row's embedding, and its url
    first = next(i for i, t in enumerate(truth) if t[1])
    emb = np.load(corpus / "img_emb" / "img_emb_2.npy")
    meta = pq.read_table(corpus / "metadata" / "metadata_2.parquet").to_pydict()
    emb[0], meta["caption"][0] = truth[first][2], "tiger"
    meta["url"][1], meta["caption"][1] = f"http://x/{first // 40}/{first % 40}.jpg", "tiger"
    np.save(corpus / "img_emb" / "img_emb_2.npy", emb)
    pq.write_table(pa.table(meta), corpus / "metadata" / "metadata_2.parquet")
    truth[80] = (truth[80][0], {2}, emb[0])
    truth[81] = (truth[81][0], {2}, truth[81][2])

    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"tiger": ["Panthera tigris"]}))
    code = main(
        [
            "db",
            "select",
            "--corpus",
            str(corpus),
            "--classes",
            str(_classes(tmp_path)),
            "--by",
            "caption",
            "--synonyms",
            str(syn),
            "--out",
            str(tmp_path / "sel"),
            "--quiet",
        ]
    )
    assert code == 0
    expected = [(i, c) for i, c, _ in truth if c and i not in ("000020000", "000020001")]
    got = metadata(tmp_path / "sel")
    assert got.column("id").to_pylist() == [i for i, _ in expected]
    assert [set(c) for c in got.column("classes").to_pylist()] == [c for _, c in expected]
    sel = json.loads((tmp_path / "sel" / "manifest.json").read_text())["provenance"]["selection"]
    assert sel["by"] == "caption" and sel["rows_scanned"] == 120
    assert sel["duplicates_dropped"] == {"embedding": 1, "origin": 0, "url": 1}
    assert sel["counts"] == {n: sum(c in s for _, s in expected) for c, n in enumerate(CLASSES)}
    assert sel["synonyms"]["per_class"][2] == ["Panthera tigris"]


def test_select_drops_a_corpus_row_reached_twice(tmp_path: Path) -> None:
    corpus, truth = caption_corpus(tmp_path / "laion", shards=2, rows=30, seed=5)
    import_database([corpus], tmp_path / "db16")
    import_database([corpus], tmp_path / "db32", dtype="float32")  # other bytes, same origin
    manifest = select_by_caption(
        [tmp_path / "db16", tmp_path / "db32"],
        CLASSES,
        tmp_path / "sel",
        synonyms=[[], [], ["Panthera tigris"], []],
    )
    matching = sum(bool(c) for _, c, _ in truth)
    sel = manifest.provenance["selection"]
    assert sel["rows_selected"] == matching and sel["rows_scanned"] == 120
    assert sel["duplicates_dropped"] == {"embedding": 0, "origin": matching, "url": 0}
    assert metadata(tmp_path / "sel").column("source").to_pylist()[0].startswith("laion/img_emb/")


def _classes(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def test_select_streams_shards_in_bounded_memory(tmp_path: Path) -> None:
    """Peak Python/numpy and Arrow allocations of a selection do not grow with the number
    of shards: 20 shards of ~370-character captions peak like 2 shards."""
    rng = np.random.default_rng(7)
    filler = " ".join(["lorem ipsum dolor sit amet"] * 11)
    parts = []
    for s in range(20):
        emb = unit(rng.standard_normal((2000, 32))).astype(np.float16)
        caps = [f"{'a tiger' if r % 100 == 0 else 'no'} {filler} {s} {r}" for r in range(2000)]
        parts.append((emb, caps, [f"u{s}/{r}" for r in range(2000)]))
    big = write_clip_corpus(tmp_path / "big", parts)
    small = write_clip_corpus(tmp_path / "small", parts[:2])
    code = f"""
import json, tracemalloc, pyarrow as pa
from ratta.db.select import select_by_caption
tracemalloc.start()
select_by_caption([{str(small)!r}], ["tiger"], {str(tmp_path / "warm")!r})  # lazy imports
peaks = []
for corpus, out in (({str(small)!r}, "s"), ({str(big)!r}, "b")):
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    m = select_by_caption([corpus], ["tiger"], {str(tmp_path)!r} + "/" + out)
    peaks.append([tracemalloc.get_traced_memory()[1] - before, m.count])
print(json.dumps([peaks, pa.default_memory_pool().max_memory()]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    (small_peak, small_rows), (big_peak, big_rows) = json.loads(res.stdout.splitlines()[-1])[0]
    arrow_peak = json.loads(res.stdout.splitlines()[-1])[1]
    assert (small_rows, big_rows) == (40, 400)
    assert big_peak < small_peak + 1_000_000, (small_peak, big_peak)
    # loading every caption at once would hold ~17 MB of Python strings
    assert big_peak < 8_000_000 and arrow_peak < 8_000_000, (big_peak, arrow_peak)


def test_select_by_knn_takes_the_k_nearest_per_query(tmp_path: Path) -> None:
    corpus, _ = caption_corpus(tmp_path / "laion", shards=3, rows=50, seed=3)
    rows = np.concatenate([np.load(corpus / "img_emb" / f"img_emb_{i}.npy") for i in range(3)])
    rng = np.random.default_rng(4)
    queries = unit(rng.standard_normal((5, 16))).astype(np.float32)
    owner = np.array([0, 0, 1, 2, 2])
    manifest = select_by_knn([corpus], queries, owner, ["a", "b", "c"], tmp_path / "sel", k=7)
    dist = ((rows.astype(np.float32)[None] - queries[:, None]) ** 2).sum(-1)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :7]
    classes: dict[int, set[int]] = {}
    for q, ids in enumerate(nearest):
        for r in ids:
            classes.setdefault(int(r), set()).add(int(owner[q]))
    got = metadata(tmp_path / "sel")
    got_rows = [int(i[:5]) * 50 + int(i[5:]) for i in got.column("id").to_pylist()]
    assert got_rows == sorted(classes)
    assert [set(c) for c in got.column("classes").to_pylist()] == [
        classes[r] for r in sorted(classes)
    ]
    assert manifest.provenance["selection"]["counts"] == {
        n: sum(c in s for s in classes.values()) for c, n in enumerate("abc")
    }
    emb, _, _ = load_for_search(tmp_path / "sel")
    assert np.array_equal(emb.numpy(), rows[sorted(classes)].astype(np.float32))


# ------------------------------------------------------------------------------ audit


def test_audit_finds_planted_duplicates_and_writes_a_clean_copy(
    world: SyntheticWorld, world_files, tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(8)
    db = world.database.copy()
    planted = {3: 17, 11: 200, 12: 201, 40: 333}  # test image -> database row
    for img, row in planted.items():
        db[row] = unit(world.image[img].numpy() + 0.01 * rng.standard_normal(db.shape[1]))
    np.save(tmp_path / "db.npy", db.astype(np.float16))
    import_database([tmp_path / "db.npy"], tmp_path / "db", shard_rows=100)
    code = main(
        [
            "db",
            "audit",
            "--db",
            str(tmp_path / "db"),
            "--features",
            str(world_files["features"]),
            "--text",
            str(world_files["text"]),
            "--threshold",
            "0.98",
            "--report",
            str(tmp_path / "audit.json"),
            "--write-clean",
            str(tmp_path / "clean"),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert {(p["image"], p["row"]) for p in report["pairs"]} == set(planted.items())
    per_class = {c["class"]: c["images_with_duplicates"] for c in report["per_class"]}
    labels = world.labels.tolist()
    for c in range(world.text.num_classes):
        assert per_class[c] == sum(labels[i] == c for i in planted)
    out = capsys.readouterr().out
    assert "4 images have near-duplicates, 4 rows flagged" in out
    assert world.text.class_names[labels[3]] in out

    clean = Database(tmp_path / "clean")
    assert clean.count == db.shape[0] - 4
    emb, _, _ = load_for_search(tmp_path / "clean")
    keep = np.setdiff1d(np.arange(db.shape[0]), list(planted.values()))
    assert np.array_equal(emb.numpy(), db.astype(np.float16)[keep].astype(np.float32))
    assert metadata(tmp_path / "clean").column("source_row").to_pylist() == keep.tolist()
    audit = clean.manifest.provenance["audit"]
    assert audit["flagged_rows"] == 4 and audit["threshold"] == 0.98 and audit["features_sha256"]

    again = find_duplicates(tmp_path / "clean", world_files["features"], 0.98)
    assert again.pairs == []


def test_audit_clean_copy_keeps_the_index_spec(world_files, tmp_path: Path) -> None:
    import_database(
        [world_files["db"]],
        tmp_path / "db",
        index=IndexSettings(spec="IVF4,Flat", search_params="nprobe=2", train_rows=460),
    )
    report = find_duplicates(tmp_path / "db", world_files["features"], 0.99)
    manifest = write_clean(tmp_path / "db", report, tmp_path / "clean")
    assert manifest.index["spec"] == "IVF4,Flat" and manifest.index["search_params"] == "nprobe=2"


# ------------------------------------------------------------------------------ build


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    spec = BackboneSpec(
        model=None, pretrained=str(tiny_clip["checkpoint"]), model_config=str(tiny_clip["config"])
    )
    return load_backbone(spec)


def open_clip_center_crops(tiny_clip, images: list) -> torch.Tensor:
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(tiny_clip["checkpoint"])
    )
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        return F.normalize(model.encode_image(pixels), dim=-1)


def test_build_from_a_folder_matches_open_clip_center_crops(
    backbone, tiny_clip, tmp_path: Path
) -> None:
    paths = write_images(tmp_path / "imgs" / "sub", 5, seed=1)
    (tmp_path / "imgs" / "sub" / "img001.txt").write_text("a red square\n")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "imgs" / "notes.md").write_text("ignored")
    manifest, summary = build_database(
        [tmp_path / "imgs"], backbone, tmp_path / "db", dtype="float32", workers=0, chunk_size=2
    )
    assert summary["skipped"] == 1 and summary["skipped_images"][0]["path"].endswith("broken.jpg")
    assert manifest.provenance["skipped"] == 1 and manifest.count == 5
    assert manifest.backbone["model"] == "tiny-clip"
    emb, _, _ = load_for_search(tmp_path / "db")
    cos = (emb * open_clip_center_crops(tiny_clip, paths)).sum(1)
    assert bool((cos >= 0.999).all()), cos
    meta = metadata(tmp_path / "db")
    assert meta.column("id").to_pylist() == [f"sub/img00{i}" for i in range(5)]
    assert meta.column("caption").to_pylist()[1] == "a red square"
    assert not Path(f"{tmp_path / 'db'}.build").exists()


def test_build_from_webdataset_tars(backbone, tiny_clip, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", 4, seed=2)
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, p in enumerate(paths):
            key = f"part/{i:06d}"
            tf.add(p, arcname=f"{key}.{p.suffix[1:]}")
            caption = tmp_path / f"c{i}.txt"
            caption.write_text(f"caption {i}")
            tf.add(caption, arcname=f"{key}.txt")
        tf.add(tmp_path / "c0.txt", arcname="part/000009.json")
        (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 corrupt")
        tf.add(tmp_path / "bad.jpg", arcname="part/000010.jpg")
    manifest, summary = build_database([tar_path], backbone, tmp_path / "db", workers=2)
    assert summary["skipped"] == 1 and manifest.count == 4 and manifest.dtype == "float16"
    emb, _, _ = load_for_search(tmp_path / "db")
    cos = (emb * open_clip_center_crops(tiny_clip, paths)).sum(1)
    assert bool((cos >= 0.999).all()), cos
    meta = metadata(tmp_path / "db")
    assert meta.column("id").to_pylist() == [f"part/{i:06d}" for i in range(4)]
    assert meta.column("caption").to_pylist() == [f"caption {i}" for i in range(4)]
    assert manifest.provenance["sources"][0]["format"] == "webdataset"


def test_build_resumes_from_finished_chunks(backbone, tmp_path: Path, monkeypatch) -> None:
    import ratta.extract as extract_mod

    write_images(tmp_path / "imgs", 6, seed=3)
    calls = {"n": 0}
    real = extract_mod._write_chunk

    def dies_after_two(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "_write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_database([tmp_path / "imgs"], backbone, tmp_path / "db", workers=0, chunk_size=2)
    assert not (tmp_path / "db").exists()
    monkeypatch.setattr(extract_mod, "_write_chunk", real)
    manifest, summary = build_database(
        [tmp_path / "imgs"], backbone, tmp_path / "db", workers=0, chunk_size=2
    )
    assert summary["resumed_chunks"] == 2 and manifest.count == 6
