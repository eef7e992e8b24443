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
from ratta.peer_stage import DMN_ORACLE_GAMMAS
from ratta.peers import (
    correlated_streams,
    dmn,
    dmn_inputs,
    peer_defaults,
    shuffled_streams,
    tda,
    tda_inputs,
)
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


def test_each_part_of_a_cell_is_recomputed_alone_and_says_why(setup) -> None:
    out = setup["tmp"] / "eval"
    base = ["eval", "--datasets", "dtd", "--seeds", "0", "--out", str(out), *setup["args"]]
    peers_only = ["--methods", "cupl", "tda", "dmn_zs"]
    assert main([*base, *peers_only]) == 0  # no database needed without retrieval, ratta
    cell = out / "cells" / "dtd" / "seed-0"

    def state() -> tuple[dict, dict]:
        record = json.loads((cell / "cell.json").read_text())
        files = {p.name: p.stat().st_mtime_ns for p in cell.glob("*.safetensors")}
        return record, files

    record, files = state()
    assert sorted(files) == ["baselines.safetensors", "peers.safetensors"]
    assert {r["method"] for r in read_csv(out / "results.csv")} == {"cupl", "tda", "dmn_zs"}
    # another stream count: the peers only
    assert main([*base, *peers_only, "--streams", "2"]) == 0
    record, after = state()
    assert record["computed"] == ["peers"] and record["reason"] == "computed: changed peers.streams"
    assert after["baselines.safetensors"] == files["baselines.safetensors"]
    assert after["peers.safetensors"] != files["peers.safetensors"]
    # RA-TTA asked for: its adaptation only (the database is needed now)
    argv = [*base, "--db-root", str(setup["dbs"]), "--streams", "2"]
    assert main(argv) == 0
    record, files = state()
    assert record["computed"] == ["adapt", "peers"]  # and ZERO, MTA, BoostAdapter
    assert "peers.runs.zero" in record["parts"]["peers"]["reason"]
    assert record["parts"]["adapt"]["reason"] == "computed: not done before"
    # one of RA-TTA's hyperparameters: the adaptation only
    assert main([*argv, "--k-s", "3"]) == 0
    record, after = state()
    assert record["computed"] == ["adapt"] and record["reason"] == "computed: changed config.k_s"
    assert after["peers.safetensors"] == files["peers.safetensors"]
    assert after["predictions.safetensors"] != files["predictions.safetensors"]
    # a run without RA-TTA keeps what its part computed, for a later run
    every_peer = ["--methods", "cupl", "zero", "mta", "tda", "boostadapter", "dmn_zs"]
    assert main([*base, *every_peer, "--streams", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["cells_reused"] == 1
    assert main([*argv, "--k-s", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["cells_reused"] == 1


def test_dmn_oracle_on_class_correlated_streams(setup) -> None:
    out = setup["tmp"] / "eval"
    argv = ["eval", "--datasets", "dtd", "--seeds", "0", "--out", str(out), *setup["args"]]
    argv += ["--methods", "dmn_zs", "--dmn-oracle", "--stream-correlation", "0.01"]
    assert main(argv) == 0
    rows = read_csv(out / "results.csv")
    oracle = [r for r in rows if r["method"] == "dmn_zs_oracle"]
    assert {r["label"] for r in oracle} == {"DMN-ZS (ratta views, oracle gamma, 5 of 32 inputs)"}
    assert len(oracle) == 6  # 2 classifiers x 3 streams
    plain = {
        (r["classifier"], r["stream"]): float(r["top1"]) for r in rows if r["method"] == "dmn_zs"
    }
    for r in oracle:  # the grid holds gamma = 1: the oracle is at least as good on its labels
        assert float(r["top1"]) >= plain[r["classifier"], r["stream"]] - 1e-9
    cell = out / "cells" / "dtd" / "seed-0"
    stored = load_file(str(cell / "peers.safetensors"))
    gammas = stored["dmn_zs_oracle/gamma"]
    assert gammas.shape == (2, 3) and set(gammas.flatten().tolist()) <= set(DMN_ORACLE_GAMMAS)
    report = json.loads((out / "results.json").read_text())
    configs = [r["config"]["gamma"] for r in report["rows"] if r["method"] == "dmn_zs_oracle"]
    assert configs == gammas.flatten().tolist()
    streams = correlated_streams(stored["labels"], 0.01, 3, seed=0)
    assert all(torch.equal(stored[f"order/stream-{k}"], streams[k]) for k in range(3))
    md = (out / "results.md").read_text()
    assert "3 class-correlated (Dirichlet gamma = 0.01) streams" in md
    assert "| DMN-ZS, Δ | |" in md and "oracle gamma: DMN-ZS with gamma picked" in md


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--streams", "0"], "--streams must be >= 1, got 0"),
        (["--stream-correlation", "nan"], "--stream-correlation must be a finite number > 0"),
        (["--stream-correlation", "-0.1"], "--stream-correlation must be a finite number > 0"),
        (["--stream-correlation", "inf"], "--stream-correlation must be a finite number > 0"),
        (["--methods", "tda", "tent"], "--methods: unknown tent"),
        (["--methods", "tda", "tda"], "--methods: tda is given twice"),
        (["--methods", "tda", "--dmn-oracle"], "--dmn-oracle applies to DMN-ZS"),
        (["--methods", "mta", "--views", "0"], "--views 0: MTA needs at least one view"),
        (["--methods", "ratta"], "--db-root is needed for retrieval and ratta"),
    ],
)
def test_bad_peer_flags_are_one_line_before_any_work(setup, capsys, extra, message) -> None:
    out = setup["tmp"] / "eval"
    argv = ["eval", "--datasets", "dtd", "--out", str(out), *setup["args"], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ratta: error: ") and message in err[0], err
    assert not out.exists()


def test_sweep_over_a_peers_hyperparameter_needs_no_database(setup) -> None:
    out = setup["tmp"] / "sweep"
    base = ["sweep", "--dataset", "dtd", "--out", str(out), *setup["args"]]
    assert main([*base, "--param", "dmn_zs.gamma", "--values", "0", "1", "--streams", "2"]) == 0
    results = json.loads((out / "sweep_dmn_zs.gamma.json").read_text())["results"]
    assert [(r["value"], r["classifier"]) for r in results] == [
        (0.0, "paper"),
        (0.0, "cupl"),
        (1.0, "paper"),
        (1.0, "cupl"),
    ]
    assert all(r["streams"] == 2 and len(r["top1_per_stream"]) == 2 for r in results)
    assert len(read_csv(out / "sweep_dmn_zs.gamma.csv")) == 4
    with Image.open(out / "sweep_dmn_zs.gamma.png") as img:
        assert img.size == (800, 450)
    # gamma = 0 is zero-shot on z_0, whatever the stream
    run = next((out / "runs").glob("dmn_zs.gamma-0.0-*"))
    stored = load_file(str(run / "peers.safetensors"))
    text = load_text(next((setup["tmp"] / "cache" / "text").glob("*.safetensors")))
    reader = FeatureReader(next((setup["tmp"] / "cache" / "features").glob("*.safetensors")))
    z0 = reader.batch(0, reader.num_images, views=0)[:, 0].float()
    reader.close()
    for key, w in (("paper", text.baselines["peer_dmn"]), ("cupl", text.classifier)):
        p0 = torch.softmax(text.logit_scale * z0 @ w.float().T, dim=-1)
        for k in range(2):
            assert torch.allclose(stored[f"dmn_zs/{key}/stream-{k}"], p0, atol=1e-6)


@pytest.mark.parametrize(
    ("param", "values", "message"),
    [
        ("tda.alpha_pos", ["-1"], "tda.alpha_pos -1 is outside >= 0"),
        ("zero.gamma", ["0"], "zero.gamma 0 is outside > 0 and <= 1"),
        ("dmn_zs.memory", ["1.5"], "dmn_zs.memory takes integers, got 1.5"),
        ("mta.inputs", ["9"], "mta.inputs 9 is outside >= 2 and <= 5 (z_0 and the 4 views"),
        ("boostadapter.delta", ["nan"], "nan is not a finite number"),
        ("tda.beta_pos", ["2", "2"], "--values: 2.0 is given twice"),
        ("tda.nope", ["2"], "--param must be one of k_d"),
    ],
)
def test_peer_sweep_values_are_checked_before_any_work(
    setup, capsys, param, values, message
) -> None:
    out = setup["tmp"] / "sweep"
    argv = ["sweep", "--dataset", "dtd", "--out", str(out), *setup["args"]]
    assert main([*argv, "--param", param, "--values", *values]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_streams_whose_outputs_cannot_fit_on_disk_fail_the_cell_in_one_line(setup) -> None:
    """A billion streams: refused by the size of peers.safetensors (before the orders are
    drawn, which alone would exhaust memory); the cell's failure names it."""
    out = setup["tmp"] / "eval"
    argv = ["eval", "--datasets", "dtd", "--out", str(out), *setup["args"]]
    assert main([*argv, "--methods", "cupl", "tda", "--streams", "1000000000"]) == 1
    failures = json.loads((out / "results.json").read_text())["failures"]
    assert failures and all("GiB, its filesystem has" in f["error"] for f in failures)
    assert all(f["error"].endswith("free") and "peers.safetensors" in f["error"] for f in failures)
