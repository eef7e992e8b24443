"""Extraction: center crop and views match independent open_clip computations, resumable."""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import write_images
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

import ratta.extract as extract_mod
from ratta.errors import RattaInputError
from ratta.extract import ExtractSettings, extract_features
from ratta.views import image_seed


@pytest.fixture()
def images(tmp_path):
    return write_images(tmp_path / "imgs", 11, seed=5)


def run(tiny_backbone, images, out, views=6, seed=3, **kw):
    labels = [i % 4 for i in range(len(images))]
    kw.setdefault("workers", 0)
    return extract_features(
        images,
        labels,
        tiny_backbone,
        out,
        ExtractSettings(views=views, seed=seed, dtype="float32"),
        **kw,
    )


def test_image_embedding_equals_open_clip_center_crop(
    tiny_backbone, tiny_clip, images, tmp_path
) -> None:
    run(tiny_backbone, images, tmp_path / "f.safetensors", batch_size=4)
    got = load_file(str(tmp_path / "f.safetensors"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(tiny_clip["checkpoint"])
    )
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in images])
        expected = F.normalize(model.encode_image(pixels), dim=-1)
    cos = (got["image"] * expected).sum(1)
    assert bool((cos >= 0.999).all()), cos.min()
    assert got["views"].shape == (11, 6, 32)
    assert torch.equal(got["labels"], torch.tensor([i % 4 for i in range(11)]))
    norms = torch.linalg.vector_norm(got["views"], dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_views_are_seeded_random_resized_crops(tiny_backbone, tiny_clip, images, tmp_path) -> None:
    run(tiny_backbone, images[:3], tmp_path / "f.safetensors", views=4, seed=9)
    got = load_file(str(tmp_path / "f.safetensors"))["views"]
    model, _, _ = open_clip.create_model_and_transforms(
        "tiny-clip", pretrained=str(tiny_clip["checkpoint"])
    )
    model.eval()
    aug = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip()])
    tail = T.Compose(
        [
            T.ToTensor(),
            T.Normalize(tiny_backbone.preprocessing.mean, tiny_backbone.preprocessing.std),
        ]
    )
    for index in range(3):
        img = Image.open(images[index]).convert("RGB")
        torch.manual_seed(image_seed(9, index))
        crops = torch.stack([tail(aug(img)) for _ in range(4)])
        with torch.no_grad():
            expected = F.normalize(model.encode_image(crops), dim=-1)
        assert bool(((got[index] * expected).sum(-1) >= 0.999).all())


def test_identical_across_batch_sizes_and_workers(tiny_backbone, images, tmp_path) -> None:
    run(tiny_backbone, images, tmp_path / "a.safetensors", batch_size=1, chunk_size=3)
    run(tiny_backbone, images, tmp_path / "b.safetensors", batch_size=5, chunk_size=100, workers=2)
    a = load_file(str(tmp_path / "a.safetensors"))
    b = load_file(str(tmp_path / "b.safetensors"))
    for key in ("image", "views", "labels", "index"):
        assert torch.equal(a[key], b[key]), key


def test_identical_across_torch_thread_counts(tiny_backbone, images, tmp_path) -> None:
    """The same bytes with 1 and 2 threads (MKL's strict reproducibility, set by ratta):
    a Ray worker of one CPU writes what a local run on all cores writes."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run(tiny_backbone, images, tmp_path / f"t{threads}.safetensors", views=4, chunk_size=3)
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "t1.safetensors").read_bytes() == (tmp_path / "t2.safetensors").read_bytes()


def test_different_seeds_give_different_views(tiny_backbone, images, tmp_path) -> None:
    run(tiny_backbone, images[:2], tmp_path / "a.safetensors", seed=1)
    run(tiny_backbone, images[:2], tmp_path / "b.safetensors", seed=2)
    a = load_file(str(tmp_path / "a.safetensors"))
    b = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["views"], b["views"])


def test_resumed_run_equals_uninterrupted(tiny_backbone, images, tmp_path, monkeypatch) -> None:
    run(tiny_backbone, images, tmp_path / "whole.safetensors", chunk_size=2)
    out = tmp_path / "resumed.safetensors"
    real_write = extract_mod._write_chunk
    written = []

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(*args, **kwargs)
        written.append(args[0])

    monkeypatch.setattr(extract_mod, "_write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_backbone, images, out, chunk_size=2)
    assert not out.exists()
    assert len(list((tmp_path / "resumed.safetensors.parts").glob("chunk-*"))) == 2
    monkeypatch.setattr(extract_mod, "_write_chunk", real_write)
    summary = run(tiny_backbone, images, out, chunk_size=2)
    assert summary["resumed_chunks"] == 2
    whole = load_file(str(tmp_path / "whole.safetensors"))
    resumed = load_file(str(out))
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert not (tmp_path / "resumed.safetensors.parts").exists()


def test_resume_refuses_other_settings(tiny_backbone, images, tmp_path, monkeypatch) -> None:
    out = tmp_path / "f.safetensors"
    monkeypatch.setattr(
        extract_mod, "_write_chunk", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        run(tiny_backbone, images, out, chunk_size=2)
    monkeypatch.undo()
    with pytest.raises(
        RattaInputError, match=r"other inputs or settings is there \(changed: seed\)"
    ):
        run(tiny_backbone, images, out, chunk_size=2, seed=4)


def test_corrupt_and_truncated_images_are_skipped_and_listed(
    tiny_backbone, images, tmp_path
) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (40, 40)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    paths = [*images[:3], tmp_path / "bad.jpg", truncated, images[3]]
    summary = extract_features(
        paths,
        list(range(6)),
        tiny_backbone,
        tmp_path / "f.safetensors",
        ExtractSettings(views=2),
        workers=0,
    )
    assert summary["skipped"] == 2
    assert {s["index"] for s in summary["skipped_images"]} == {3, 4}
    got = load_file(str(tmp_path / "f.safetensors"))
    assert got["labels"].tolist() == [0, 1, 2, 5] and got["index"].tolist() == [0, 1, 2, 5]
    assert got["image"].dtype == torch.float16
    on_disk = json.loads((tmp_path / "f.safetensors.json").read_text())
    assert on_disk["skipped"] == 2 and "bad.jpg" in on_disk["skipped_images"][0]["path"]


def test_features_file_feeds_adapt(tiny_backbone, images, tmp_path) -> None:
    from ratta.adapt import adapt
    from ratta.files import FeatureReader

    run(tiny_backbone, images, tmp_path / "f.safetensors")
    reader = FeatureReader(tmp_path / "f.safetensors")
    assert reader.num_images == 11 and reader.num_views == 6 and reader.dim == 32
    assert callable(adapt)


def test_zero_views_writes_an_empty_views_tensor(tiny_backbone, images, tmp_path) -> None:
    run(tiny_backbone, images[:3], tmp_path / "f.safetensors", views=0)
    got = load_file(str(tmp_path / "f.safetensors"))
    assert got["views"].shape == (3, 0, 32) and got["image"].shape == (3, 32)


def test_outputs_follow_the_umask(tiny_backbone, images, tmp_path) -> None:
    run(tiny_backbone, images[:2], tmp_path / "f.safetensors", views=1)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
