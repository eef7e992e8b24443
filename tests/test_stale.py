"""Hostile use, classes 2-4: caches keyed on content, early one-line failures, honest warnings."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_coop, write_images

import ratta.run
from ratta.cli import main

CLASSES = ["zigzagged", "banded", "woven_fabric"]


def descriptions(names: list[str], count: int = 6, word: str = "photo") -> dict[str, list[str]]:
    return {n: [f"A {word} of {n}, view {i}." for i in range(count)] for n in names}


@pytest.fixture()
def world(tmp_path, tiny_clip):
    root = tmp_path / "data"
    paths, _ = make_coop(root, "dtd", CLASSES, per_class=3)
    names = [c.replace("_", " ") for c in CLASSES]
    desc = tmp_path / "desc" / "CuPL_prompts_dtd.json"
    desc.parent.mkdir()
    desc.write_text(json.dumps(descriptions(names)))
    dbs = tmp_path / "dbs"
    dbs.mkdir()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((60, 32)).astype(np.float32)
    np.save(dbs / "dtd.npy", vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    backbone = ["--model-config", str(tiny_clip["config"])]
    backbone += ["--pretrained", str(tiny_clip["checkpoint"])]
    common = ["--views", "2", "--workers", "0", "--quiet", "--cache", str(tmp_path / "cache")]
    return {
        "root": root,
        "paths": paths,
        "desc": desc,
        "dbs": dbs,
        "tmp": tmp_path,
        "args": [*backbone, *common],
    }


def eval_argv(w, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--datasets",
        "dtd",
        "--seeds",
        "0",
        "--data-root",
        str(w["root"]),
        "--db-root",
        str(w["dbs"]),
        "--descriptions",
        str(w["desc"].parent),
        "--out",
        str(out),
        *w["args"],
        *extra,
    ]


def cell(out: Path) -> dict:
    return json.loads((out / "cells" / "dtd" / "seed-0" / "cell.json").read_text())


def report(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_eval_recomputes_a_cell_when_any_input_changes_and_says_why(world) -> None:
    out = world["tmp"] / "eval"
    assert main(eval_argv(world, out)) == 0
    assert report(out)["cells_computed"] == 1
    assert main(eval_argv(world, out)) == 0
    assert report(out)["cells_reused"] == 1

    # the descriptions' content changes, same file name
    names = [c.replace("_", " ") for c in CLASSES]
    world["desc"].write_text(json.dumps(descriptions(names, word="picture")))
    assert main(eval_argv(world, out)) == 0
    assert report(out)["cells_computed"] == 1
    assert cell(out)["reason"] == "computed: changed text.descriptions"

    # the database is replaced by one of another size
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((80, 32)).astype(np.float32)
    np.save(world["dbs"] / "dtd.npy", vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    assert main(eval_argv(world, out)) == 0
    assert report(out)["cells_computed"] == 1
    assert cell(out)["reason"].startswith("computed: changed database.")

    # the same bytes under another data root
    moved = world["tmp"] / "moved"
    world["root"].rename(moved)
    world["root"] = moved
    assert main(eval_argv(world, out)) == 0
    assert report(out)["cells_computed"] == 1
    assert "features.split.root" in cell(out)["reason"]

    # --force recomputes what did not change
    assert main(eval_argv(world, out, "--force")) == 0
    assert report(out)["cells_computed"] == 1 and cell(out)["reason"] == "computed: --force"


def test_eval_database_of_another_dimension_fails_before_any_work(
    world, monkeypatch, capsys
) -> None:
    np.save(world["dbs"] / "dtd.npy", np.eye(8, 16, dtype=np.float32))

    def no_model(*_a, **_k):
        raise AssertionError("the mismatch must be found before loading the model")

    monkeypatch.setattr(ratta.run, "load_backbone", no_model)
    out = world["tmp"] / "eval"
    assert main(eval_argv(world, out)) == 1
    failure = report(out)["failures"][0]["error"]
    assert "dimension 16 but the backbone" in failure and "embeds in 32" in failure


def run_argv(w, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--dataset",
        "dtd",
        "--data-root",
        str(w["root"]),
        "--db",
        str(w["dbs"] / "dtd.npy"),
        "--descriptions",
        str(w["desc"]),
        "--out",
        str(out),
        *w["args"],
        *extra,
    ]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_run_recomputes_features_after_an_image_is_repaired(world) -> None:
    broken = world["paths"][0]
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    out = world["tmp"] / "r"
    with pytest.warns(UserWarning, match="1 of 9 test images could not be read"):
        assert main(run_argv(world, out)) == 0
    first = results(out)
    assert first["skipped"] == 1 and first["split_images"] == 9
    assert first["counts"]["images"] == 8
    full = first["metrics_full_split"]["ratta"]["top1"]
    assert full == pytest.approx(first["metrics"]["ratta"]["top1"] * 8 / 9)
    broken.write_bytes(good)
    os.utime(broken, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert main(run_argv(world, out)) == 0
    second = results(out)
    assert second["skipped"] == 0 and second["counts"]["images"] == 9
    assert second["cache"]["features_reason"] == "computed: changed split.images"
    assert second["cache"]["text_reused"]


def test_run_does_not_reuse_features_of_another_data_root(world) -> None:
    assert main(run_argv(world, world["tmp"] / "r1")) == 0
    copy = world["tmp"] / "copy"
    make_coop(copy, "dtd", CLASSES, per_class=3)  # the same split, other bytes
    world["root"] = copy
    assert main(run_argv(world, world["tmp"] / "r1")) == 0
    assert not results(world["tmp"] / "r1")["cache"]["features_reused"]
    assert "split.root" in results(world["tmp"] / "r1")["cache"]["features_reason"]


def test_templates_only_descriptions_warn_that_ratta_cannot_adapt(world) -> None:
    names = [c.replace("_", " ") for c in CLASSES]
    world["desc"].write_text(json.dumps(descriptions(names, count=2)))
    out = world["tmp"] / "r"
    with pytest.warns(UserWarning, match="fewer than min_desc = 5"):
        assert main(run_argv(world, out)) == 0
    assert "RA-TTA equals zero-shot" in results(out)["warnings"][0]


def test_eval_refuses_a_seed_or_dataset_given_twice(world, capsys) -> None:
    argv = eval_argv(world, world["tmp"] / "e")
    seeds = argv.index("--seeds")
    assert main([*argv[: seeds + 1], "0", "0", *argv[seeds + 2 :]]) == 2
    assert "--seeds: 0 is given twice" in capsys.readouterr().err
    assert main([*argv[:2], "dtd", "dtd", *argv[3:]]) == 2
    assert "--datasets: dtd is given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("param", "value", "needle"),
    [
        ("k_s", "nan", "not a finite number"),
        ("quantile", "inf", "not a finite number"),
        ("quantile", "1.5", "outside [0, 1]"),
        ("k_d", "0", "outside >= 1"),
        ("k_d", "2.5", "takes integers"),
        ("views", "3", "outside 0..2"),
    ],
)
def test_sweep_values_are_checked_before_any_work(world, capsys, param, value, needle) -> None:
    out = world["tmp"] / "s"
    argv = ["sweep", "--param", param, "--values", "1", value, "--dataset", "dtd"]
    argv += ["--data-root", str(world["root"]), "--db", str(world["dbs"] / "dtd.npy")]
    argv += ["--descriptions", str(world["desc"]), "--views", "2", "--out", str(out)]
    assert main([*argv, *world["args"][:4]]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not out.exists() and not (world["tmp"] / "cache").exists()


def test_sweep_takes_the_other_hyperparameters_as_fixed_flags(world) -> None:
    out = world["tmp"] / "s"
    argv = ["sweep", "--param", "k_s", "--values", "2", "3", "--dataset", "dtd"]
    argv += ["--data-root", str(world["root"]), "--db", str(world["dbs"] / "dtd.npy")]
    argv += ["--descriptions", str(world["desc"]), "--out", str(out)]
    argv += ["--k-d", "10", "--quantile", "0.5", "--min-desc", "2", *world["args"]]
    assert main(argv) == 0
    fixed = json.loads((out / "sweep_k_s.json").read_text())["fixed"]
    assert fixed["k_d"] == 10 and fixed["quantile"] == 0.5 and fixed["min_desc"] == 2


def test_fp16_on_the_cpu_is_refused(world, capsys) -> None:
    out = world["tmp"] / "r"
    assert main(run_argv(world, out, "--precision", "fp16")) == 2
    assert "autocast applies on CUDA only" in capsys.readouterr().err
    assert not out.exists()


def test_a_symlink_loop_in_a_folder_dataset_is_one_line(world, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    write_images(folder / "cls" / "sub", 2)
    (folder / "cls" / "sub" / "loop").symlink_to(folder / "cls")
    argv = ["extract", "--dataset", "folder", "--data-root", str(folder), "--out", "f"]
    code = main([*argv, *world["args"][:4]])
    err = capsys.readouterr().err
    assert code == 2 and "loops back to a folder above it" in err and err.count("\n") == 1
