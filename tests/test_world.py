"""The generated image world: determinism, captions, the test split, descriptions, weights."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ratta.backbones import load_backbone
from ratta.cli import main
from ratta.datasets import load_split
from ratta.db.select import CaptionMatcher
from ratta.errors import RattaInputError
from ratta.text import load_descriptions, match_descriptions
from ratta.world.demo import plan, run_world_demo, step_keys
from ratta.world.draw import render
from ratta.world.model import (
    MERGES,
    MODEL_CONFIG,
    VOCABULARY,
    WEIGHTS,
    backbone_spec,
    vocabulary_bytes,
)
from ratta.world.scenes import SHIFTS
from ratta.world.train import TrainSettings, train
from ratta.world.vocabulary import CLASS_NAMES, CLASSES
from ratta.world.write import SPLIT_FILE, WorldSettings, corpus_item, shifted_item, write_world

SMALL = WorldSettings(seed=3, corpus_size=70, test_per_class=3, shard_size=30)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    write_world(out, SMALL, workers=1)
    return out


@pytest.fixture(scope="module")
def world_backbone():
    return load_backbone(backbone_spec())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_world_is_the_same_bytes_for_a_seed_whatever_the_workers(small_world, tmp_path):
    again = tmp_path / "again"
    write_world(again, SMALL, workers=2)
    assert _files(again) == _files(small_world)
    other = tmp_path / "other"
    write_world(other, WorldSettings(seed=4, corpus_size=70, test_per_class=3, shard_size=30))
    assert _files(other)["corpus/shard-00000.tar"] != _files(small_world)["corpus/shard-00000.tar"]


def test_world_layout_counts_and_shards(small_world):
    manifest = json.loads((small_world / "world.json").read_text())
    assert manifest["classes"] == list(CLASS_NAMES)
    assert manifest["corpus"]["shards"] == [f"corpus/shard-0000{k}.tar" for k in range(3)]
    jpgs = list((small_world / "test" / "images").rglob("*.jpg"))
    assert len(jpgs) == 3 * len(CLASSES)
    with Image.open(jpgs[0]) as im:
        assert im.size == (SMALL.image_size, SMALL.image_size) and im.mode == "RGB"


def test_an_existing_world_is_reused_only_with_the_same_settings(small_world):
    assert write_world(small_world, SMALL)["reused"] is True
    with pytest.raises(RattaInputError, match="not the world of these settings"):
        write_world(small_world, WorldSettings(seed=9, corpus_size=70))


def test_an_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    import ratta.world.write as write

    def fail(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_write_test", fail)
    with pytest.raises(KeyboardInterrupt):
        write_world(tmp_path / "w", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_most_captions_name_their_class_and_every_class_is_named():
    matcher = CaptionMatcher([[n] for n in CLASS_NAMES])
    items = [corpus_item(WorldSettings(seed=0), i) for i in range(600)]
    named = [it.scene.label in matcher.match(it.caption) for it in items]
    assert 0.8 < np.mean(named) < 1.0  # web noise: some captions do not name the class
    assert {c for it in items for c in matcher.match(it.caption)} == set(range(len(CLASSES)))


def test_shifted_items_cycle_through_the_shifts_in_class_order():
    items = [shifted_item(SMALL, i) for i in range(2 * SMALL.test_per_class)]
    assert [it.scene.label for it in items] == [0, 0, 0, 1, 1, 1]
    assert [it.shift for it in items[:3]] == list(SHIFTS)


def test_render_is_a_pure_function_of_the_scene():
    scene = shifted_item(SMALL, 5).scene
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert render(scene, 32).size == (32, 32)


def test_split_is_read_by_the_folder_loader_in_the_split_files_order(small_world):
    split = load_split("folder", small_world / "test" / "images")
    assert split.class_names == list(CLASS_NAMES)
    rows = json.loads((small_world / "test" / SPLIT_FILE).read_text())["test"]
    images = small_world / "test" / "images"
    assert [(path, label) for path, label in split.items] == [
        (images / path, label) for path, label, _ in rows
    ]
    assert [name for _, _, name in rows] == [CLASS_NAMES[label] for _, label, _ in rows]


def test_descriptions_cover_every_class_with_enough_sentences(small_world):
    descriptions = load_descriptions(small_world / "descriptions.json")
    per_class, missing = match_descriptions(CLASS_NAMES, descriptions, "descriptions.json")
    assert missing == []
    assert all(len(d) >= 5 for d in per_class)  # min_desc of the paper


def test_shipped_weights_are_fp16_under_5_mb_and_load_through_ratta(world_backbone):
    assert WEIGHTS.stat().st_size < 5_000_000
    with safe_open(str(WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    dim = json.loads(MODEL_CONFIG.read_text())["embed_dim"]
    pixels = torch.rand(2, 3, world_backbone.preprocessing.size, world_backbone.preprocessing.size)
    image = world_backbone.encode_images(pixels)
    text = world_backbone.encode_texts(["a photo of a house.", "a red umbrella in the sky"])
    assert image.shape == (2, dim) and text.shape == (2, dim)
    assert torch.allclose(image.norm(dim=1), torch.ones(2), atol=1e-5)
    assert world_backbone.fingerprint["tokenizer_bpe_path_sha256"]


def test_the_world_vocabulary_tokenises_any_text_within_the_model(world_backbone):
    tokens = world_backbone.tokenizer(["a zebra-striped xylophone, naïve café 😀"])
    vocab = json.loads(MODEL_CONFIG.read_text())["text_cfg"]["vocab_size"]
    assert int(tokens.max()) < vocab


def _pictures(n: int) -> tuple[torch.Tensor, list[str]]:
    items = [corpus_item(SMALL, i) for i in range(n)]
    pixels = [np.asarray(render(it.scene)) for it in items]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), [it.caption for it in items]


def test_training_is_deterministic_under_a_seed():
    pixels, captions = _pictures(32)
    settings = TrainSettings(epochs=2, batch_size=16, warmup_steps=1)
    first, log = train(pixels, captions, settings, progress=False)
    second, _ = train(pixels, captions, settings, progress=False)
    assert log["steps"] == 4
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = train(
        pixels, captions, TrainSettings(seed=1, epochs=1, batch_size=16), progress=False
    )
    assert not torch.equal(other.model.state_dict()["text_projection"], a["text_projection"])


# ------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The world demo on a tiny world with the shipped CLIP, run twice (the second cached)."""
    folder = tmp_path_factory.mktemp("demo") / "d"
    first = run_world_demo(folder, command=main, settings=SMALL, views=3, workers=0, explain=2)
    second = run_world_demo(folder, command=main, settings=SMALL, views=3, workers=0, explain=2)
    return {"folder": folder, "first": first, "second": second}


def test_the_demo_runs_every_command_once_then_reuses_them(demo):
    steps = ["db build", "extract", "text", "db select", "adapt", "explain"]
    assert list(demo["first"]["ran"]) == steps
    assert all(demo["first"]["ran"].values()) and not any(demo["second"]["ran"].values())
    assert demo["second"]["top1"] == demo["first"]["top1"]
    assert (
        json.loads((demo["folder"] / "results.json").read_text())["top1"] == (demo["first"]["top1"])
    )


def test_the_demo_figures_are_recomputed_from_its_files(demo):
    from safetensors.torch import load_file

    run = demo["folder"] / "run"
    pred = load_file(str(run / "predictions.safetensors"))
    feats = load_file(str(run / "features.safetensors"))
    text = load_file(str(run / "text.safetensors"))
    labels = pred["labels"]
    single = feats["image"].float() @ text["baseline_single_template"].float().T
    probs = {
        "clip": single,
        "cupl": pred["zero_shot"],
        "retrieval": pred["retrieval"],
        "ratta": pred["final"],
    }
    top1 = demo["first"]["top1"]
    assert top1["images"] == len(labels) == SMALL.test_per_class * len(CLASSES)
    for method, p in probs.items():
        hit = p.argmax(1) == labels
        assert top1[method]["all"] == pytest.approx(100 * hit.float().mean().item(), abs=0.01)
        for k, shift in enumerate(SHIFTS):  # test items cycle through the shifts
            rows = torch.arange(len(labels)) % SMALL.test_per_class % len(SHIFTS) == k
            assert top1[method][shift] == pytest.approx(
                100 * hit[rows].float().mean().item(), abs=0.01
            )


def test_a_changed_setting_changes_the_keys_of_the_steps_that_depend_on_it(demo):
    world = next(demo["folder"].glob("world-*"))

    def keys(views: int) -> dict[str, str]:
        steps = plan(demo["folder"], world, WEIGHTS, views=views, workers=0, explain=2)
        return step_keys(steps)

    assert keys(3) == {
        s: (demo["folder"] / "run" / f"{s.replace(' ', '-')}.stamp").read_text().strip()
        for s in keys(3)
    }
    changed = {s for s, k in keys(2).items() if k != keys(3)[s]}
    assert changed == {"extract", "adapt", "explain"}


@pytest.mark.parametrize("flag", ["--views", "--explain", "--workers", "--seed"])
def test_a_bad_demo_setting_is_one_line_before_any_work(tmp_path, capsys, flag):
    assert main(["demo", "--dir", str(tmp_path / "d"), flag, "-1"]) == 2
    assert f"ratta: error: {flag} must be >=" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_demo_keeps_out_of_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RattaInputError, match="not a ratta world demo folder"):
        run_world_demo(tmp_path, command=main, settings=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_explain_on_the_world_draws_the_rows_the_engine_retrieved(demo):
    """The PNGs are whole images of the documented size; each candidate's retrieved rows
    are the K_S database rows nearest its set prototype (recomputed in float64 from the
    saved top descriptions: no other row is nearer, up to float32 rounding)."""
    from safetensors.torch import load_file

    from ratta.config import RATTAConfig
    from ratta.db.store import Database
    from ratta.explain import HEIGHT, WIDTH

    run = demo["folder"] / "run"
    summary = json.loads((run / "explain" / "explain.json").read_text())
    pngs = sorted((run / "explain").glob("*.png"))
    assert len(pngs) == len(summary["images"]) > 0
    for png in pngs:
        with Image.open(png) as img:
            img.load()
            assert img.format == "PNG" and img.size == (WIDTH, HEIGHT)
    pred = load_file(str(run / "predictions.safetensors"))
    desc = load_file(str(run / "text.safetensors"))["desc"].double()
    desc_class = load_file(str(run / "text.safetensors"))["desc_class"]
    database = Database(run / "db")
    rows = torch.from_numpy(database.rows(np.arange(database.count)).astype(np.float64))
    k_s = RATTAConfig().k_s
    checked = 0
    for i in range(len(pred["labels"])):
        top = pred["top_descriptions"][i]
        for slot, c in enumerate(pred["candidates"][i].tolist()):
            if c < 0:
                continue
            mine = top[desc_class[top] == c]
            proto = desc[mine].mean(0)
            dist = ((rows - proto / proto.norm()) ** 2).sum(1)
            got = pred["retrieved"][i, slot]
            assert len(set(got.tolist())) == min(k_s, database.count)
            others = torch.ones(database.count, dtype=torch.bool)
            others[got] = False
            assert dist[got].max() <= dist[others].min() + 1e-5
            checked += 1
    assert checked > 0
    shown_rows = [
        r["row"] for e in summary["images"] for c in e["candidates"] for r in c["retrieved"]
    ]
    assert shown_rows and all(
        r["image"] and not r["missing"]
        for e in summary["images"]
        for c in e["candidates"]
        for r in c["retrieved"]
    )
    first = summary["images"][0]
    slot = pred["candidates"][first["row"]].tolist().index(first["candidates"][0]["class"])
    assert [r["row"] for r in first["candidates"][0]["retrieved"]] == (
        pred["retrieved"][first["row"], slot].tolist()
    )


def test_the_shipped_vocabulary_is_open_clips_cut_after_its_first_merges():
    assert VOCABULARY.read_bytes() == vocabulary_bytes()
    merges = gzip.decompress(VOCABULARY.read_bytes()).decode().split("\n")[1:]
    vocab = json.loads(MODEL_CONFIG.read_text())["text_cfg"]["vocab_size"]
    assert len(merges) == MERGES and vocab == 2 * 256 + MERGES + 2
