"""`ratta eval` and `ratta sweep`: every number recomputable from the per-image outputs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_coop
from PIL import Image
from safetensors.torch import load_file

import ratta.run
from ratta.cli import main
from ratta.files import FeatureReader, load_text
from ratta.metrics import expected_calibration_error
from ratta.peers import dmn, dmn_inputs, peer_defaults, shuffled_streams, tda, tda_inputs
from ratta.provenance import git_commit
from ratta.summary import format_times

CLASSES = {
    "dtd": ["zigzagged", "banded", "woven_fabric"],
    "caltech101": ["accordion", "yin_yang", "car_side", "Faces"],
}
METHOD_KEYS = {  # (method, classifier) of the rows of RA-TTA and its baselines
    ("clip", "single_template"),
    ("ensemble", "template_ensemble"),
    ("cupl", "cupl"),
    ("retrieval", "cupl"),
    ("ratta", "cupl"),
}
PEER_RUNS = {  # the peers' runs on the transfer datasets, with their streams
    "zero": [""],
    "mta": [""],
    "tda": ["0", "1", "2"],
    "boostadapter": ["0", "1", "2"],
    "dmn_zs": ["0", "1", "2"],
}


@pytest.fixture()
def setup(tmp_path, tiny_clip):
    root, dbs, desc = tmp_path / "data", tmp_path / "dbs", tmp_path / "desc"
    dbs.mkdir()
    desc.mkdir()
    rng = np.random.default_rng(1)
    for i, (name, classes) in enumerate(CLASSES.items()):
        make_coop(root, name, classes, per_class=3, seed=10 * i)
        names = [c.replace("_", " ") for c in classes]
        (desc / f"CuPL_prompts_{name}.json").write_text(
            json.dumps(
                {
                    n: [f"A photo showing {n}.", f"{n} seen up close.", f"The {n} object."]
                    for n in names
                }
            )
        )
        vecs = rng.standard_normal((40, 32)).astype(np.float32)
        np.save(dbs / f"{name}.npy", vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    args = [
        "--data-root",
        str(root),
        "--descriptions",
        str(desc),
        "--views",
        "4",
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
        "--cache",
        str(tmp_path / "cache"),
        "--workers",
        "0",
        "--quiet",
    ]
    return {"root": root, "dbs": dbs, "args": args, "tmp": tmp_path}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def reference_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    total = 0.0
    conf, pred = probs.max(1)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [i for i in range(len(conf)) if lo < float(conf[i]) <= hi]
        if inside:
            acc = sum(int(pred[i] == labels[i]) for i in inside) / len(inside)
            avg = sum(float(conf[i]) for i in inside) / len(inside)
            total += len(inside) / len(conf) * abs(acc - avg)
    return 100 * total


def reference_topk(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    hits = [
        int(labels[i]) in probs[i].topk(min(k, probs.shape[1])).indices.tolist()
        for i in range(len(labels))
    ]
    return 100 * sum(hits) / len(hits)


def test_eval_reports_are_recomputable_and_rerun_does_no_work(setup, monkeypatch, capsys) -> None:
    out = setup["tmp"] / "eval"
    argv = [
        "eval",
        "--datasets",
        "dtd",
        "caltech101",
        "--db-root",
        str(setup["dbs"]),
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        *setup["args"],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    rows = read_csv(out / "results.csv")
    cells = {(r["dataset"], r["seed"], r["method"], r["classifier"], r["stream"]) for r in rows}
    expected = {(d, s, m, c, "") for d in CLASSES for s in ("0", "1") for m, c in METHOD_KEYS}
    expected |= {
        (d, s, m, c, k)
        for d in CLASSES
        for s in ("0", "1")
        for c in ("paper", "cupl")
        for m, streams in PEER_RUNS.items()
        for k in streams
    }
    assert cells == expected and len(rows) == len(expected)
    for r in rows:  # every number from the per-image file the row names
        cell = out / "cells" / r["dataset"] / f"seed-{r['seed']}"
        file, key = r["probabilities"].split(":")
        probs = load_file(str(cell / file))[key]
        labels = load_file(str(cell / file))["labels"]
        assert torch.equal(labels, load_file(str(cell / "predictions.safetensors"))["labels"])
        assert float(r["top1"]) == pytest.approx(reference_topk(probs, labels, 1), abs=1e-4)
        assert float(r["top5"]) == pytest.approx(reference_topk(probs, labels, 5), abs=1e-4)
        assert float(r["ece"]) == pytest.approx(reference_ece(probs, labels), abs=1e-3)
        assert int(r["images"]) == labels.shape[0] == 3 * len(CLASSES[r["dataset"]])
        assert torch.allclose(probs.sum(1), torch.ones(len(labels)), atol=1e-5), r["method"]
    labels = {r["method"]: r["label"] for r in rows}
    assert labels["tda"] == "TDA (z0)" and labels["zero"] == "ZERO (5 of 64 inputs)"
    assert labels["dmn_zs"] == "DMN-ZS (ratta views, 5 of 32 inputs)"
    report = json.loads((out / "results.json").read_text())
    assert report["cells_computed"] == 4 and not report["failures"]
    assert report["ratta_commit"] == git_commit()
    stages = ("check", "extract", "text", "adapt", "baselines", "peers", "reports")
    assert tuple(report["stage_seconds"]) == stages
    assert printed == format_times(report["seconds"], report["stage_seconds"])
    md = (out / "results.md").read_text()
    assert "| dtd |" in md and "| caltech101 |" in md and "Average (2 of 13)" in md
    # no published figure covers these two datasets: the 13-dataset averages stay out
    average = next(line for line in md.splitlines() if line.startswith("| Average"))
    assert average.endswith("| – | – | – |") and "70.81" not in md and "73.09" not in md
    peers = md[md.index("## RA-TTA and training-free peers") :]
    assert "| TDA (z0) | paper |" in peers and "| TDA (z0) | CuPL |" in peers
    assert "| TDA, published | | 94.24 | 47.40 | 70.82† |" in peers  # caltech101, dtd
    assert "DMN-ZS, published (gamma searched on the test labels" in peers
    assert "DMN-ZS, Δ" not in peers  # gamma = 1 is not its paper's oracle: no difference
    assert "BoostAdapter, published (secondary sources)" in peers
    with Image.open(out / "plots" / "gain_over_cupl.png") as img:
        assert img.format == "PNG" and img.size == (800, 450)

    def no_backbone(*_a, **_k):
        raise AssertionError("a rerun must not load the backbone")

    monkeypatch.setattr(ratta.run, "load_backbone", no_backbone)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")}
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cells_computed"] == 0 and again["cells_reused"] == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")} == mtimes
    assert read_csv(out / "results.csv") == rows


def test_online_peers_are_recomputable_from_the_stream_orders(setup) -> None:
    out = setup["tmp"] / "eval"
    argv = ["eval", "--datasets", "dtd", "--db-root", str(setup["dbs"]), "--seeds", "3"]
    argv += ["--methods", "tda", "dmn_zs", "--streams", "2", "--out", str(out), *setup["args"]]
    assert main(argv) == 0
    cell = out / "cells" / "dtd" / "seed-3"
    stored = load_file(str(cell / "peers.safetensors"))
    n = stored["labels"].shape[0]
    orders = shuffled_streams(n, 2, seed=3)
    assert all(torch.equal(stored[f"order/stream-{k}"], orders[k]) for k in range(2))
    record = json.loads((cell / "cell.json").read_text())
    assert sorted(record["computed"]) == ["baselines", "peers"]  # no adaptation asked
    cache = setup["tmp"] / "cache"  # the cell's features and text, the only ones there
    text = load_text(next((cache / "text").glob("*.safetensors")))
    reader = FeatureReader(next((cache / "features").glob("*.safetensors")))
    x = reader.batch(0, n, views=4).float()
    reader.close()
    w, s = text.baselines["peer_tda"].float(), text.logit_scale
    defaults = peer_defaults("dtd")
    for k in range(2):
        again = tda(tda_inputs(x, w, s, defaults.tda), orders[k], w, s, defaults.tda)
        assert torch.allclose(again.probs, stored[f"tda/paper/stream-{k}"], atol=1e-6)
        cfg = replace(defaults.dmn, inputs=5)
        w_cupl = text.classifier.float()
        again = dmn(dmn_inputs(x, w_cupl, s, cfg), orders[k], w_cupl, s, cfg)
        assert torch.allclose(again.probs, stored[f"dmn_zs/cupl/stream-{k}"], atol=1e-6)


def test_a_failing_dataset_does_not_stop_the_others(setup, capsys) -> None:
    (setup["dbs"] / "caltech101.npy").unlink()
    out = setup["tmp"] / "eval"
    argv = [
        "eval",
        "--datasets",
        "caltech101",
        "dtd",
        "--db-root",
        str(setup["dbs"]),
        "--seeds",
        "0",
        "--out",
        str(out),
        *setup["args"],
    ]
    assert main(argv) == 1
    report = json.loads((out / "results.json").read_text())
    assert [f["dataset"] for f in report["failures"]] == ["caltech101"]
    assert "no database for caltech101" in report["failures"][0]["error"]
    assert {r["dataset"] for r in report["rows"]} == {"dtd"}
    assert "Failed cells" in (out / "results.md").read_text()


def test_unknown_dataset_is_one_line(setup, capsys) -> None:
    argv = [
        "eval",
        "--datasets",
        "mnist",
        "--db-root",
        str(setup["dbs"]),
        "--out",
        str(setup["tmp"] / "e"),
        *setup["args"],
    ]
    assert main(argv) == 2
    assert "unknown mnist" in capsys.readouterr().err


def test_sweep_reuses_one_extraction(setup) -> None:
    out = setup["tmp"] / "sweep"
    base = [
        "--dataset",
        "dtd",
        "--db",
        str(setup["dbs"] / "dtd.npy"),
        "--out",
        str(out),
        *setup["args"],
    ]
    assert main(["sweep", "--param", "k_s", "--values", "2", "5", *base]) == 0
    results = json.loads((out / "sweep_k_s.json").read_text())["results"]
    assert [r["value"] for r in results] == [2, 5]
    assert [r["features_reused"] for r in results] == [False, True]
    with Image.open(out / "sweep_k_s.png") as img:
        assert img.size == (800, 450)
    assert main(["sweep", "--param", "views", "--values", "0", "4", *base]) == 0
    views = json.loads((out / "sweep_views.json").read_text())["results"]
    assert all(r["features_reused"] for r in views)
    assert len(read_csv(out / "sweep_views.csv")) == 2


def test_eval_and_sweep_load_the_model_and_each_database_once(setup, monkeypatch) -> None:
    import ratta.db.search

    loads = {"backbone": 0, "database": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            loads[name] += 1
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ratta.run, "load_backbone", counting("backbone", ratta.run.load_backbone))
    monkeypatch.setattr(
        ratta.db.search, "open_search", counting("database", ratta.db.search.open_search)
    )
    dbs = str(setup["dbs"])
    argv = ["eval", "--datasets", "dtd", "--db-root", dbs, "--seeds", "0", "1", "--out"]
    assert main([*argv, str(setup["tmp"] / "eval"), *setup["args"]]) == 0
    assert loads == {"backbone": 1, "database": 1}  # 2 cells: 2 extractions, 2 adaptations
    base = ["--dataset", "dtd", "--db", f"{dbs}/dtd.npy", "--out", str(setup["tmp"] / "sw")]
    assert main(["sweep", "--param", "k_s", "--values", "2", "5", "9", *base, *setup["args"]]) == 0
    # the database once more for 3 values; the model not at all (seed 0's files are cached)
    assert loads == {"backbone": 1, "database": 2}


def test_ece_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 7, generator=g), 1)
    labels = torch.randint(0, 7, (200,), generator=g)
    assert expected_calibration_error(probs, labels) == pytest.approx(
        reference_ece(probs, labels), abs=1e-9
    )
    perfect = torch.eye(5)
    assert expected_calibration_error(perfect, torch.arange(5)) == 0.0
