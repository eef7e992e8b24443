"""`ratta extract`, `ratta text`, `ratta run` and `ratta describe` on a CoOp-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import DTD_CLASSES, make_coop_dtd
from PIL import Image
from safetensors.torch import load_file

from ratta.cli import main
from ratta.files import load_text


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "data"
    paths, labels = make_coop_dtd(root)
    names = [n.replace("_", " ") for n in DTD_CLASSES]
    desc = tmp_path / "cupl.json"
    desc.write_text(json.dumps({n: [f"A {n} texture.", f"Lines of {n}."] for n in names}))
    db = tmp_path / "db.npy"
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 32)).astype(np.float32)
    np.save(db, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    return {"root": root, "paths": paths, "labels": labels, "desc": desc, "db": db, "names": names}


def backbone_args(tiny_clip) -> list[str]:
    return [
        "--model-config",
        str(tiny_clip["config"]),
        "--pretrained",
        str(tiny_clip["checkpoint"]),
    ]


def test_extract_cli_follows_the_split_and_matches_open_clip(
    data, tiny_clip, tmp_path, capsys
) -> None:
    out = tmp_path / "f.safetensors"
    argv = [
        "extract",
        "--dataset",
        "dtd",
        "--data-root",
        str(data["root"]),
        "--views",
        "3",
        "--seed",
        "1",
        "--out",
        str(out),
        "--workers",
        "0",
        "--quiet",
        *backbone_args(tiny_clip),
    ]
    assert main(argv) == 0
    assert "9 images" in capsys.readouterr().out
    got = load_file(str(out))
    assert got["labels"].tolist() == data["labels"]
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(tiny_clip["checkpoint"])
    )
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in data["paths"]])
        expected = F.normalize(model.eval().encode_image(pixels), dim=-1)
    assert bool(((got["image"].float() * expected).sum(1) >= 0.999).all())
    summary = json.loads((tmp_path / "f.safetensors.json").read_text())
    assert summary["source"]["dataset"] == "dtd" and summary["views"] == 3


def test_extract_cli_lists_ten_skipped_images_and_counts_the_rest(
    tiny_clip, tmp_path, capsys
) -> None:
    from conftest import write_images

    folder = tmp_path / "imgs" / "cls"
    write_images(folder, 2)
    for i in range(12):
        (folder / f"broken{i:02d}.jpg").write_bytes(b"not an image")
    out = tmp_path / "f.safetensors"
    argv = ["extract", "--dataset", "folder", "--data-root", str(tmp_path / "imgs")]
    argv += ["--views", "1", "--workers", "0", "--quiet", "--out", str(out)]
    assert main([*argv, *backbone_args(tiny_clip)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 images x (1 + 1) crops, 12 skipped")
    assert sum(line.startswith("  skipped ") for line in lines) == 10
    assert f"  ... and 2 more (all listed in {out}.json)" in lines
    assert len(json.loads(Path(f"{out}.json").read_text())["skipped_images"]) == 12


def test_text_cli_uses_split_class_order(data, tiny_clip, tmp_path, capsys) -> None:
    out = tmp_path / "t.safetensors"
    argv = [
        "text",
        "--dataset",
        "dtd",
        "--data-root",
        str(data["root"]),
        "--descriptions",
        str(data["desc"]),
        "--out",
        str(out),
        *backbone_args(tiny_clip),
    ]
    assert main(argv) == 0
    # one bar over every distinct text encoded: 3 x (2 templates + 2 descriptions) classifier
    # texts, 3 x 3 description rows, 3 x 1 single template ('a photo of a {}.', ZERO's too)
    # and 3 x 1 '{} texture.' (TDA's, DMN-ZS's); the ensemble's and DMN-ZS's other texts
    # are the classifier's
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("text: 100%") and " 27/27 " in bar, bar
    text = load_text(out)
    assert text.class_names == data["names"]
    assert text.desc_class.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_run_caches_features_and_text(data, tiny_clip, tmp_path) -> None:
    argv = [
        "run",
        "--dataset",
        "dtd",
        "--data-root",
        str(data["root"]),
        "--db",
        str(data["db"]),
        "--descriptions",
        str(data["desc"]),
        "--views",
        "4",
        "--workers",
        "0",
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
        *backbone_args(tiny_clip),
    ]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 0
    first = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert first["cache"]["features_reused"] is False and first["cache"]["text_reused"] is False
    assert first["config"]["quantile"] == 0.75 and first["counts"]["images"] == 9
    assert (tmp_path / "r1" / "results.md").read_text().count("RA-TTA") == 1
    # a rerun with another K_S reuses both caches and never loads the backbone
    assert main([*argv, "--out", str(tmp_path / "r2"), "--k-s", "5"]) == 0
    second = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert second["cache"] == {
        **first["cache"],
        "features_reused": True,
        "features_reason": "reused (in the cache)",
        "text_reused": True,
        "text_reason": "reused (in the cache)",
        "backbone_loaded": False,
    }
    assert first["cache"]["features_reason"] == "computed: not in the cache"
    assert second["config"]["k_s"] == 5
    first_pred = load_file(str(tmp_path / "r1" / "predictions.safetensors"))
    assert torch.equal(
        first_pred["zero_shot"],
        load_file(str(tmp_path / "r2" / "predictions.safetensors"))["zero_shot"],
    )
    # another seed changes the views: new features, same text
    assert main([*argv, "--out", str(tmp_path / "r3"), "--seed", "7"]) == 0
    third = json.loads((tmp_path / "r3" / "results.json").read_text())
    assert third["cache"]["features_reused"] is False and third["cache"]["text_reused"] is True
    assert third["cache"]["features"] != first["cache"]["features"]


def test_imagenet_family_defaults_to_q_090(tiny_clip) -> None:
    from ratta.run import dataset_preset

    assert dataset_preset("imagenet_sketch").quantile == 0.9
    assert dataset_preset("folder").quantile == 0.75
    assert dataset_preset("folder", "dtd").pre.startswith("a photo of a {}, which is")


def test_describe_output_feeds_text(data, tiny_clip, tmp_path) -> None:
    cupl = tmp_path / "described.json"
    assert (
        main(
            [
                "describe",
                "--dataset",
                "dtd",
                "--data-root",
                str(data["root"]),
                "--templates-only",
                "--out",
                str(cupl),
                "--quiet",
            ]
        )
        == 0
    )
    described = json.loads(cupl.read_text())
    assert list(described) == data["names"]
    out = tmp_path / "t.safetensors"
    assert (
        main(
            [
                "text",
                "--dataset",
                "dtd",
                "--data-root",
                str(data["root"]),
                "--descriptions",
                str(cupl),
                "--out",
                str(out),
                *backbone_args(tiny_clip),
            ]
        )
        == 0
    )
    assert load_text(out).class_names == data["names"]


def test_extract_killed_mid_run_resumes_to_the_same_file(tiny_clip, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    for i in range(16):  # large PNGs decode slowly enough to be killed mid-run
        Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    exe = str(Path(sys.executable).with_name("ratta"))

    def cmd(out):
        return [
            exe,
            "extract",
            "--dataset",
            "folder",
            "--data-root",
            str(tmp_path / "imgs"),
            "--views",
            "2",
            "--chunk-size",
            "2",
            "--workers",
            "0",
            "--quiet",
            "--out",
            str(out),
            *backbone_args(tiny_clip),
        ]

    out = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(f"{out}.parts")
    deadline = time.monotonic() + 60
    while len(list(parts.glob("chunk-*.safetensors"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("chunk-*.safetensors")))
    assert 2 <= done_before < 8 and not out.exists()
    for chunk in parts.glob("chunk-*.safetensors"):  # visible chunks are complete
        assert load_file(str(chunk))["image"].shape[0] == 2
    subprocess.run(cmd(out), check=True, capture_output=True)
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["resumed_chunks"] == done_before
    whole = tmp_path / "whole.safetensors"
    subprocess.run(cmd(whole), check=True, capture_output=True)
    a, b = load_file(str(out)), load_file(str(whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
