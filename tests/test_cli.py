"""`ratta adapt` end to end, the file contract, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapt_args, stacked
from safetensors.torch import load_file, save_file

from ratta import ExactRetriever, RATTAConfig, ratta_batch
from ratta.cli import main
from ratta.synthetic import SyntheticWorld


def test_adapt_writes_the_documented_outputs(
    world: SyntheticWorld, world_files, tmp_path, capsys
) -> None:
    out = tmp_path / "pred.safetensors"
    assert main(adapt_args(world_files, out, "--batch-size", "16")) == 0
    stdout = capsys.readouterr().out
    assert "RA-TTA" in stdout and "zero-shot" in stdout
    got = load_file(str(out))
    n, c = world.labels.shape[0], world.text.num_classes
    for key in ("zero_shot", "retrieval", "final"):
        assert got[key].shape == (n, c) and got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].sum(1), torch.ones(n))
    assert got["candidates"].shape == (n, 4) and got["candidates"].dtype == torch.int64
    assert torch.equal(got["labels"], world.labels)
    t = world.text
    expected = ratta_batch(
        stacked(world),
        t.classifier,
        t.desc,
        t.desc_class,
        t.logit_scale,
        ExactRetriever(torch.from_numpy(world.database)),
        RATTAConfig(),
    )
    torch.testing.assert_close(got["final"], expected.final, atol=1e-5, rtol=0)
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["counts"]["images"] == n and summary["counts"]["classes"] == c
    assert summary["config"]["k_d"] == 20
    top1 = 100 * float((expected.final.argmax(1) == world.labels).float().mean())
    assert summary["metrics"]["ratta"]["top1"] == pytest.approx(top1)
    assert set(summary["timings_s"]) >= {"load", "scoring", "search", "ot", "total"}


def test_float64_and_faiss_search_give_the_same_predictions(world_files, tmp_path) -> None:
    base, f64, fa = (tmp_path / f"{n}.safetensors" for n in ("base", "f64", "faiss"))
    assert main(adapt_args(world_files, base)) == 0
    assert main(adapt_args(world_files, f64, "--dtype", "float64")) == 0
    assert main(adapt_args(world_files, fa, "--search", "faiss")) == 0
    ref = load_file(str(base))["final"]
    torch.testing.assert_close(load_file(str(f64))["final"], ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(load_file(str(fa))["final"], ref, atol=1e-5, rtol=0)


def test_float16_inputs_are_accepted(world: SyntheticWorld, tmp_path) -> None:
    paths = world.write(tmp_path / "half", dtype=torch.float16)
    out = tmp_path / "o.safetensors"
    assert main(adapt_args(paths, out)) == 0
    assert load_file(str(out))["final"].shape[0] == world.labels.shape[0]


def test_hyperparameters_reach_the_engine(world_files, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    assert main(adapt_args(world_files, out, "--k-d", "4", "--min-desc", "5")) == 0
    got = load_file(str(out))
    torch.testing.assert_close(got["final"], got["zero_shot"])
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["counts"]["fallback"] == summary["counts"]["images"]


def test_console_script_runs(world_files, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    exe = Path(sys.executable).with_name("ratta")
    proc = subprocess.run(
        [str(exe), *adapt_args(world_files, out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "RA-TTA" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["db", "build", "--help"], ["extract", "--views", "3"]],
)
def test_help_version_and_usage_errors_start_without_torch(argv: list[str]) -> None:
    """The parser needs no torch (1 s of imports), numpy or the HTTP client of describe
    (~70 ms): help and usage errors come at once."""
    heavy = ["torch", "numpy", "httpx2", "asyncio"]
    code = (
        "import sys\nfrom ratta.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"sys.exit(9 if any(m in sys.modules for m in {heavy!r}) else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"a heavy module was imported by ratta {' '.join(argv)}"
    assert proc.stdout or proc.stderr.startswith("usage: ratta extract")


# ----------------------------------------------------------------------------- bad input


def rewrite(path: Path, drop: str | None = None, metadata: dict | None = None, **replace):
    tensors = load_file(str(path))
    with open(path, "rb") as fh:  # keep the metadata unless told otherwise
        header_len = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(header_len)).get("__metadata__", {})
    if drop:
        tensors.pop(drop)
    tensors.update(replace)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata=meta if metadata is None else metadata,
    )


def expect_error(paths, tmp_path, capsys, *needles: str) -> None:
    out = tmp_path / "bad.safetensors"
    code = main(adapt_args(paths, out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ratta: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not Path(f"{out}.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_mismatched_dimensions(world_files, tmp_path, capsys) -> None:
    np.save(world_files["db"], np.load(world_files["db"])[:, :16])
    expect_error(world_files, tmp_path, capsys, str(world_files["db"]), "dimension 16")


def test_views_dimension_mismatch(world_files, tmp_path, capsys) -> None:
    views = load_file(str(world_files["features"]))["views"]
    rewrite(world_files["features"], views=views[:, :, :8])
    expect_error(world_files, tmp_path, capsys, "'views'")


def test_wrong_dtype(world_files, tmp_path, capsys) -> None:
    t = load_file(str(world_files["text"]))
    rewrite(world_files["text"], desc_class=t["desc_class"].float())
    expect_error(world_files, tmp_path, capsys, str(world_files["text"]), "'desc_class'", "int64")


def test_wrong_rank(world_files, tmp_path, capsys) -> None:
    f = load_file(str(world_files["features"]))
    rewrite(world_files["features"], image=f["image"].unsqueeze(1))
    expect_error(world_files, tmp_path, capsys, "'image'", "rank 2")


def test_integer_embeddings_rejected(world_files, tmp_path, capsys) -> None:
    f = load_file(str(world_files["features"]))
    rewrite(world_files["features"], views=f["views"].to(torch.int32))
    expect_error(world_files, tmp_path, capsys, "'views'", "float16/float32")


def test_nan_in_views(world_files, tmp_path, capsys) -> None:
    views = load_file(str(world_files["features"]))["views"].clone()
    views[13, 2, 0] = float("nan")
    rewrite(world_files["features"], views=views)
    expect_error(world_files, tmp_path, capsys, "'views'", "NaN or Inf", "row 13")


def test_inf_in_database(world_files, tmp_path, capsys) -> None:
    db = np.load(world_files["db"])
    db[5, 3] = np.inf
    np.save(world_files["db"], db)
    expect_error(world_files, tmp_path, capsys, str(world_files["db"]), "NaN or Inf", "row 5")


def test_empty_database(world_files, tmp_path, capsys) -> None:
    np.save(world_files["db"], np.zeros((0, 32), dtype=np.float32))
    expect_error(world_files, tmp_path, capsys, str(world_files["db"]), "empty")


def test_pickled_database_is_not_loaded(world_files, tmp_path, capsys) -> None:
    np.save(world_files["db"], np.array([{"embedding": 1}], dtype=object), allow_pickle=True)
    expect_error(world_files, tmp_path, capsys, str(world_files["db"]))


def test_desc_class_out_of_range(world_files, tmp_path, capsys) -> None:
    dc = load_file(str(world_files["text"]))["desc_class"].clone()
    dc[-1] = 12
    rewrite(world_files["text"], desc_class=dc)
    expect_error(world_files, tmp_path, capsys, "'desc_class'", "outside [0, 11]")


def test_class_without_descriptions(world_files, tmp_path, capsys) -> None:
    dc = load_file(str(world_files["text"]))["desc_class"].clone()
    dc[dc == 3] = 4
    rewrite(world_files["text"], desc_class=dc)
    expect_error(world_files, tmp_path, capsys, "class 3", "'class 3'", "no description")


@pytest.mark.parametrize(
    ("which", "key"),
    [
        ("features", "views"),
        ("features", "image"),
        ("text", "logit_scale"),
        ("text", "desc"),
        ("text", "classifier"),
        ("text", "desc_class"),
    ],
)
def test_missing_key(world_files, tmp_path, capsys, which: str, key: str) -> None:
    rewrite(world_files[which], drop=key)
    expect_error(world_files, tmp_path, capsys, str(world_files[which]), f"missing key '{key}'")


def test_missing_class_names(world_files, tmp_path, capsys) -> None:
    rewrite(world_files["text"], metadata={})
    expect_error(world_files, tmp_path, capsys, "class_names")


def test_missing_file(world_files, tmp_path, capsys) -> None:
    world_files["features"].unlink()
    expect_error(world_files, tmp_path, capsys, str(world_files["features"]), "not found")


def test_not_a_safetensors_file(world_files, tmp_path, capsys) -> None:
    world_files["text"].write_text("hello")
    expect_error(world_files, tmp_path, capsys, str(world_files["text"]))


def test_labels_out_of_range(world_files, tmp_path, capsys) -> None:
    labels = load_file(str(world_files["features"]))["labels"].clone()
    labels[0] = 99
    rewrite(world_files["features"], labels=labels)
    expect_error(world_files, tmp_path, capsys, "'labels'")


def test_bad_hyperparameter(world_files, tmp_path, capsys) -> None:
    out = tmp_path / "bad.safetensors"
    assert main(adapt_args(world_files, out, "--quantile", "1.5")) == 2
    assert "quantile" in capsys.readouterr().err
    assert not out.exists()


def test_unavailable_device(world_files, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    out = tmp_path / "bad.safetensors"
    assert main(adapt_args(world_files, out, "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_non_normalised_vectors_are_normalised_with_a_warning(
    world_files, tmp_path, capsys
) -> None:
    good = tmp_path / "good.safetensors"
    assert main(adapt_args(world_files, good)) == 0
    f = load_file(str(world_files["features"]))
    rewrite(world_files["features"], views=f["views"] * 3.0)
    np.save(world_files["db"], np.load(world_files["db"]) * 0.5)
    out = tmp_path / "scaled.safetensors"
    with pytest.warns(UserWarning) as record:
        assert main(adapt_args(world_files, out)) == 0
    messages = " ".join(str(w.message) for w in record)
    assert "'views'" in messages and "'database'" in messages and "normalised" in messages
    torch.testing.assert_close(
        load_file(str(out))["final"], load_file(str(good))["final"], atol=1e-5, rtol=0
    )


def test_features_without_views_or_labels(
    world: SyntheticWorld, world_files, tmp_path, capsys
) -> None:
    f = load_file(str(world_files["features"]))
    save_file(
        {"image": f["image"], "views": f["views"][:, :0].contiguous()}, str(world_files["features"])
    )
    out = tmp_path / "o.safetensors"
    assert main(adapt_args(world_files, out)) == 0
    assert "accuracy not computed" in capsys.readouterr().out
    got = load_file(str(out))
    assert "labels" not in got
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["counts"]["views"] == 0 and "metrics" not in summary
    t = world.text
    expected = ratta_batch(
        world.image.unsqueeze(1),
        t.classifier,
        t.desc,
        t.desc_class,
        t.logit_scale,
        ExactRetriever(torch.from_numpy(world.database)),
        RATTAConfig(),
    )
    torch.testing.assert_close(got["final"], expected.final, atol=1e-5, rtol=0)
