"""`ratta extract`, `ratta text`, `ratta run` and `ratta describe` on a CoOp-layout dataset."""

from __future__ import annotations

import json

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


def test_text_cli_uses_split_class_order(data, tiny_clip, tmp_path) -> None:
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
        "text_reused": True,
        "backbone_loaded": False,
    }
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
