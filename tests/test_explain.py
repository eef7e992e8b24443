"""``ratta adapt --save-retrieved`` and ``ratta explain``, on pixels: generated test images in
CoOp's layout and a database built from generated images, both through the tiny model."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    DTD_CLASSES,
    adapt_args,
    extract_argv,
    make_coop_dtd,
    reference_pickle,
    tiny_args,
    write_clip_corpus,
    write_images,
)
from PIL import Image
from reference import reference_image
from safetensors import safe_open
from safetensors.torch import load_file

from ratta.cli import main
from ratta.db.store import Database
from ratta.explain import HEIGHT, WIDTH
from ratta.files import load_text, save_text

K_S = 6


def run(*argv: str | Path) -> None:
    assert main([str(a) for a in argv]) == 0


def build_db(images: Path, out: Path, tiny_clip) -> None:
    """``ratta db build`` of a folder or shard with the tiny model."""
    run(
        "db",
        "build",
        "--images",
        images,
        "--out",
        out,
        "--workers",
        "0",
        "--quiet",
        *tiny_args(tiny_clip),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_clip) -> dict[str, Path]:
    """DTD (3 classes x 3 images), a 24-image database with captions, features, text and
    predictions with the retrieved rows."""
    root = tmp_path_factory.mktemp("explain")
    data = root / "data"
    make_coop_dtd(data, per_class=3)
    photos = root / "photos"
    for i, path in enumerate(write_images(photos, 24, seed=7)):
        path.with_suffix(".txt").write_text(f"a {DTD_CLASSES[i % 3]} pattern, photo {i}")
    names = [n.replace("_", " ") for n in DTD_CLASSES]
    cupl = root / "cupl.json"
    cupl.write_text(
        json.dumps({n: [f"A {n} texture, sentence {i}." for i in range(6)] for n in names})
    )
    paths = {
        "data": data,
        "photos": photos,
        "db": root / "db",
        "features": root / "features.safetensors",
        "text": root / "text.safetensors",
        "predictions": root / "predictions.safetensors",
    }
    model = tiny_args(tiny_clip)
    build_db(photos, paths["db"], tiny_clip)
    run(*extract_argv(tiny_clip, data, "--views", "4", "--out", paths["features"]))
    run(
        "text",
        "--dataset",
        "dtd",
        "--data-root",
        data,
        "--descriptions",
        cupl,
        "--out",
        paths["text"],
        "--quiet",
        *model,
    )
    run(
        *adapt_args(
            paths, paths["predictions"], "--save-retrieved", "--k-s", str(K_S), "--dtype", "float64"
        )
    )
    return paths


def explain_argv(
    files: dict[str, Path], out: Path, *extra: str | Path, **replace: Path
) -> list[str]:
    paths = {**files, **replace}
    argv = ["explain", "--quiet", "--out", out]
    for key in ("predictions", "features", "text", "db"):
        argv += [f"--{key}", paths[key]]
    return [str(a) for a in (*argv, "--data-root", paths["data"], *extra)]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # decodes the whole file: a truncated PNG fails here
        assert img.format == "PNG"
        return img.size


def relative_links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_the_saved_ids_are_the_rows_the_engine_retrieved(files) -> None:
    """Recomputed from the files: the K_D top descriptions, grouped by class, their set
    prototypes, and an exact L2 search of the database for each."""
    pred = load_file(str(files["predictions"]))
    feats = load_file(str(files["features"]))
    text = load_file(str(files["text"]))
    db = Database(files["db"]).rows(np.arange(Database(files["db"]).count)).astype(np.float64)
    x = torch.cat([feats["image"].unsqueeze(1), feats["views"]], 1).double().numpy()
    assert pred["retrieved"].shape == (*pred["candidates"].shape, K_S)
    survived = 0
    for i, xi in enumerate(x):
        ref = reference_image(
            xi,
            text["classifier"].double().numpy(),
            text["desc"].double().numpy(),
            text["desc_class"].numpy(),
            db,
            float(text["logit_scale"]),
            k_s=K_S,
        )
        slots = pred["candidates"][i] >= 0
        assert pred["candidates"][i, slots].tolist() == ref["classes"]
        assert pred["retrieved"][i, slots].tolist() == [r.tolist() for r in ref["retrieved"]]
        assert bool((pred["retrieved"][i, ~slots] == -1).all())
        assert pred["top_descriptions"][i].tolist() == sorted(ref["top"].tolist())
        survived += len(ref["classes"])
    assert survived > 0


def test_the_default_output_keeps_its_keys(files, tmp_path) -> None:
    out = tmp_path / "plain.safetensors"
    run(*adapt_args(files, out, "--k-s", str(K_S), "--dtype", "float64"))
    plain, saved = load_file(str(out)), load_file(str(files["predictions"]))
    extra = {"retrieved", "top_descriptions", "top_description_scores"}
    assert set(saved) - set(plain) == extra
    for key in plain:
        assert torch.equal(plain[key].nan_to_num(), saved[key].nan_to_num())


@pytest.mark.parametrize("search", ["faiss", "index"])
def test_every_search_saves_the_same_rows(files, tmp_path, search) -> None:
    db = files["db"]
    if search == "index":
        db = tmp_path / "db"
        shutil.copytree(files["db"], db)
        run("db", "index", "--db", db, "--index", "Flat")
    out = tmp_path / "p.safetensors"
    run(
        *adapt_args(
            {**files, "db": db},
            out,
            "--save-retrieved",
            "--k-s",
            str(K_S),
            "--dtype",
            "float64",
            "--search",
            search,
        )
    )
    assert torch.equal(
        load_file(str(out))["retrieved"], load_file(str(files["predictions"]))["retrieved"]
    )


def test_explain_writes_one_png_of_the_documented_size_per_image(files, tmp_path, capsys) -> None:
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "0", "5", "8"))
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["image-00000.png", "image-00005.png", "image-00008.png"]
    assert all(png_size(p) == (WIDTH, HEIGHT) == (1600, 1200) for p in pngs)
    page = (out / "index.html").read_text()
    links = relative_links(page)
    local = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    assert sorted(set(local)) == [p.name for p in pngs]
    assert all((out / link).is_file() and not Path(link).is_absolute() for link in local)
    summary = json.loads((out / "explain.json").read_text())
    pred = load_file(str(files["predictions"]))
    first = summary["images"][0]
    assert [c["class"] for c in first["candidates"]] == sorted(
        (c for c in pred["candidates"][0].tolist() if c >= 0),
        key=lambda c: -float(pred["relevance"][0][pred["candidates"][0].tolist().index(c)]),
    )
    cand = first["candidates"][0]
    slot = pred["candidates"][0].tolist().index(cand["class"])
    assert [r["row"] for r in cand["retrieved"]] == pred["retrieved"][0, slot].tolist()
    assert all(r["image"] and not r["missing"] for r in cand["retrieved"])  # local thumbnails
    assert cand["retrieved"][0]["caption"].startswith("a ") and cand["descriptions"]
    texts = json.loads(safe_open(str(files["text"]), "pt").metadata()["desc_texts"])
    assert all(d["text"] == texts[d["row"]] for d in cand["descriptions"])
    assert cand["name"] in cand["descriptions"][0]["text"]
    assert first["lam"] == pytest.approx(float(pred["lam"][0]))
    assert summary["no_thumbnails"] is None and not summary["notes"]
    assert "3 test images explained" in capsys.readouterr().out


def test_changed_picks_the_images_where_ratta_and_zero_shot_disagree(files, tmp_path) -> None:
    pred = load_file(str(files["predictions"]))
    changed = (pred["final"].argmax(1) != pred["zero_shot"].argmax(1)).nonzero().flatten().tolist()
    out = tmp_path / "changed"
    run(*explain_argv(files, out, "--changed"))
    summary = json.loads((out / "explain.json").read_text())
    assert [e["row"] for e in summary["images"]] == changed
    assert all(e["changed"] for e in summary["images"])
    run(*explain_argv(files, tmp_path / "one", "--changed", "--limit", "1"))
    assert len(list((tmp_path / "one").glob("*.png"))) == min(1, len(changed))
    assert "No test image to explain" in (tmp_path / "one" / "index.html").read_text() or changed


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("npy", "is a bare embedding array: it has no metadata"),
        ("pickle", "was imported from embeddings only (pickle): its rows name no image"),
    ],
)
def test_a_database_without_image_metadata_says_why_there_are_no_thumbnails(
    files, tmp_path, kind, why
) -> None:
    """A bare .npy, and the reference code's pickles imported by ``ratta db import``."""
    rows = Database(files["db"]).rows(np.arange(Database(files["db"]).count))
    db = tmp_path / "db.npy"
    np.save(db, rows)
    if kind == "pickle":
        run(
            "db",
            "import",
            reference_pickle(tmp_path / "LAION2B_dtd_aux", rows),
            "--out",
            tmp_path / "db",
        )
        db = tmp_path / "db"
    pred = tmp_path / "p.safetensors"
    run(*adapt_args({**files, "db": db}, pred, "--save-retrieved", "--k-s", str(K_S)))
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "1", db=db, predictions=pred))
    assert png_size(out / "image-00001.png") == (WIDTH, HEIGHT)
    summary = json.loads((out / "explain.json").read_text())
    assert why in summary["no_thumbnails"] and not summary["notes"]
    assert f"No thumbnails: {db} {why}" in (out / "index.html").read_text()
    retrieved = summary["images"][0]["candidates"][0]["retrieved"]
    assert len(retrieved) == K_S
    assert all(r["image"] is None and why in r["missing"] for r in retrieved)


def test_unreadable_and_missing_images_become_placeholders(
    files, tmp_path, tiny_clip, capsys
) -> None:
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    photos = tmp_path / "photos"
    write_images(photos, 4, seed=1)
    db = tmp_path / "db"
    build_db(photos, db, tiny_clip)
    pred = tmp_path / "p.safetensors"
    run(*adapt_args({**files, "db": db}, pred, "--save-retrieved", "--k-s", "4"))
    (photos / "img000.png").write_bytes(b"not an image")
    (photos / "img001.jpg").unlink()
    split = sorted((data / "dtd" / "images").rglob("*.*"))
    for path in split:
        path.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "2", db=db, predictions=pred, data=data))
    assert png_size(out / "image-00002.png") == (WIDTH, HEIGHT)
    notes = json.loads((out / "explain.json").read_text())["notes"]
    assert any(n.startswith("test image") and "unreadable" in n for n in notes)
    assert any("img000: unreadable" in n for n in notes)
    err = capsys.readouterr().err
    assert (
        "ratta: warning: test image" in err
        and "img001 not found below" in (out / "index.html").read_text()
    )


def fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ratta: error: ")
    return err


def test_predictions_without_the_retrieved_rows(files, tmp_path, capsys) -> None:
    plain = tmp_path / "plain.safetensors"
    run(*adapt_args(files, plain))
    out = tmp_path / "explain"
    err = fails(explain_argv(files, out, "--images", "0", predictions=plain), capsys)
    assert "rerun ratta adapt with --save-retrieved" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "9"], "--images 9: out of range; .* holds 9 test images \\(0-8\\)"),
        (["--images", "-1"], "--images -1: out of range"),
        (["--images", "1", "1"], "--images: 1 given twice"),
        (["--changed", "--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_selections(files, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "explain"
    assert re.search(message, fails(explain_argv(files, out, *extra), capsys))
    assert not out.exists()


def test_files_that_do_not_belong_together(files, world_files, tmp_path, capsys) -> None:
    out = tmp_path / "explain"
    argv = explain_argv(files, out, "--images", "0", features=world_files["features"])
    assert "come from other features" in fails(argv, capsys)
    argv = explain_argv(files, out, "--images", "0", text=world_files["text"])
    assert "class names differ" in fails(argv, capsys)
    small = tmp_path / "small.npy"
    np.save(small, np.load(world_files["db"])[:3])
    argv = explain_argv(files, out, "--images", "0", db=small)
    assert "come from another database" in fails(argv, capsys)
    other = tmp_path / "other"
    make_coop_dtd(other, per_class=3, seed=1)  # the same classes, the images in another order
    argv = explain_argv(files, out, "--images", "0", data=other)
    assert "is not the one" in fails(argv, capsys)
    assert not out.exists()


def test_outputs_never_land_on_inputs(files, tmp_path, capsys) -> None:
    inside = files["data"] / "explain"
    assert "lies inside the input --data-root" in fails(
        explain_argv(files, inside, "--images", "0"), capsys
    )
    inside = files["photos"] / "explain"
    assert "lies inside the input database images" in fails(
        explain_argv(files, inside, "--images", "0"), capsys
    )
    onto = explain_argv(files, files["predictions"], "--images", "0")
    assert "an output must not replace an input" in fails(onto, capsys)
    assert not (files["data"] / "explain").exists() and not (files["photos"] / "explain").exists()


def test_thumbnails_from_webdataset_shards(files, tmp_path, tiny_clip) -> None:
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, image in enumerate(write_images(tmp_path / "src", 5, seed=3)):
            tf.add(image, arcname=f"{i:05d}{image.suffix}")
    db = tmp_path / "db"
    build_db(shard, db, tiny_clip)
    pred = tmp_path / "p.safetensors"
    run(*adapt_args({**files, "db": db}, pred, "--save-retrieved", "--k-s", "5"))
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "3", db=db, predictions=pred))
    summary = json.loads((out / "explain.json").read_text())
    retrieved = summary["images"][0]["candidates"][0]["retrieved"]
    assert sorted(r["id"] for r in retrieved) == [f"{i:05d}" for i in range(5)]
    assert all(r["image"].startswith(f"{shard}::") for r in retrieved) and not summary["notes"]


def test_web_images_are_links_and_nothing_else_is(files, tmp_path) -> None:
    """Addresses other than http(s) never become links; captions are escaped."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    urls = [
        "https://example.org/a.jpg",
        "javascript:alert(1)",
        "http://example.org/b",
        "/nowhere.jpg",
    ]
    write_clip_corpus(tmp_path / "corpus", [(emb, ["<script>x</script>", None, "b", "c"], urls)])
    db = tmp_path / "db"
    run("db", "import", tmp_path / "corpus", "--out", db)
    pred = tmp_path / "p.safetensors"
    run(*adapt_args({**files, "db": db}, pred, "--save-retrieved", "--k-s", "4"))
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "0", db=db, predictions=pred))
    page = (out / "index.html").read_text()
    links = [link for link in relative_links(page) if not link.endswith(".png")]
    assert sorted(set(links)) == ["#image-0", "http://example.org/b", "https://example.org/a.jpg"]
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    notes = json.loads((out / "explain.json").read_text())["notes"]
    assert len(notes) == 2 and all("holds embeddings only" in n for n in notes)


def test_embeddings_without_images(world, world_files, tmp_path, capsys) -> None:
    """Generated embeddings: no split, no database metadata; images where few classes
    survive (empty candidate slots) too."""
    pred = tmp_path / "p.safetensors"
    run(*adapt_args(world_files, pred, "--save-retrieved"))
    saved = load_file(str(pred))
    assert bool((saved["candidates"] == -1).any())
    out = tmp_path / "explain"
    argv = ["explain", "--predictions", pred, "--features", world_files["features"]]
    argv += ["--text", world_files["text"], "--db", world_files["db"], "--out", out]
    run(*argv, "--changed", "--limit", "2", "--quiet")
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["images"]) == 2 and all(e["changed"] for e in summary["images"])
    assert summary["images"][0]["test_image"]["missing"] == "no --data-root given"
    assert (
        not summary["notes"]
        and "No test images: no --data-root given." in (out / "index.html").read_text()
    )
    assert all(png_size(out / e["png"]) == (WIDTH, HEIGHT) for e in summary["images"])


def test_a_text_file_with_other_description_rows(files, tmp_path, capsys) -> None:
    """Same classes and rows, other owners: the candidates no longer follow from the top
    description rows."""
    text = load_text(files["text"])
    text.desc_class = torch.zeros_like(text.desc_class)
    text.desc_class[-2:] = torch.tensor([1, 2])
    other = tmp_path / "text.safetensors"
    save_text(other, text)
    argv = explain_argv(files, tmp_path / "explain", "--images", "0", text=other)
    assert "come from another text file" in fails(argv, capsys)


def test_texts_from_files_are_shown_as_they_are(files, tmp_path) -> None:
    """A description with mathtext or markup in it is drawn and escaped, never parsed."""
    text = load_text(files["text"])
    assert text.desc_texts is not None
    text.desc_texts = [f"costs $\\frac{{$ <b>{i}</b>" for i in range(len(text.desc_texts))]
    odd = tmp_path / "text.safetensors"
    save_text(odd, text)
    out = tmp_path / "explain"
    run(*explain_argv(files, out, "--images", "4", text=odd))
    assert png_size(out / "image-00004.png") == (WIDTH, HEIGHT)
    page = (out / "index.html").read_text()
    assert "costs $\\frac{$ &lt;b&gt;" in page and "<b>" not in page
