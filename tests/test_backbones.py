"""Backbones: local checkpoints (open_clip state dict, OpenAI archive), configs, offline errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ratta.backbones import BackboneSpec, load_backbone
from ratta.errors import RattaInputError


def spec(tiny_clip, **kw) -> BackboneSpec:
    return BackboneSpec(
        model=None,
        pretrained=str(tiny_clip["checkpoint"]),
        model_config=str(tiny_clip["config"]),
        **kw,
    )


def reference_model(tiny_clip, quick_gelu: bool = False) -> nn.Module:
    model = open_clip.create_model("tiny-clip", force_quick_gelu=quick_gelu)
    model.load_state_dict(torch.load(tiny_clip["checkpoint"]))
    return model.eval()


def test_local_checkpoint_loads_the_saved_weights(tiny_clip) -> None:
    bb = load_backbone(spec(tiny_clip))
    ref = reference_model(tiny_clip)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(ref.encode_image(pixels), dim=-1)
    torch.testing.assert_close(bb.encode_images(pixels), expected)
    assert bb.logit_scale == pytest.approx(float(ref.logit_scale.detach().exp()))
    assert bb.preprocessing.size == 32 and bb.preprocessing.interpolation == "bicubic"
    assert bb.fingerprint["checkpoint_sha256"] and bb.fingerprint["model"] == "tiny-clip"


def test_every_checkpoint_format_loads_and_other_files_are_named(tiny_clip, tmp_path) -> None:
    """Legacy pickles and safetensors load like the zip checkpoint; a text, empty or other
    file is one line saying what it is (open_clip's own errors name none of them)."""
    from safetensors.torch import save_file

    state = torch.load(tiny_clip["checkpoint"])
    legacy, st = tmp_path / "legacy.pt", tmp_path / "w.safetensors"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pixels = torch.randn(2, 3, 32, 32)
    expected = load_backbone(spec(tiny_clip)).encode_images(pixels)
    for path in (legacy, st):
        loaded = load_backbone(replace(spec(tiny_clip), pretrained=str(path)))
        torch.testing.assert_close(loaded.encode_images(pixels), expected)
    cases = {
        "notes.txt": (b"weights\n", "a text file, not a checkpoint"),
        "empty.pt": (b"", "an empty file (0 bytes)"),
        "noise.bin": (bytes(range(200, 256)), "not a checkpoint (neither safetensors nor"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        bad = replace(spec(tiny_clip), pretrained=str(tmp_path / name))
        with pytest.raises(RattaInputError, match=re.escape(f"{tmp_path / name}: {needle}")):
            load_backbone(bad)


def _openai_style_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive whose state dict has OpenAI CLIP's layout (plus its extra keys)."""
    root = nn.Module()
    extra = {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    for key, value in {**state, **extra}.items():
        *parents, leaf = key.split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        if value.is_floating_point() and key not in extra:
            mod.register_parameter(leaf, nn.Parameter(value.clone()))
        else:
            mod.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_archive_loads_with_quick_gelu(tiny_clip, tmp_path) -> None:
    state = torch.load(tiny_clip["checkpoint"])
    archive = tmp_path / "ViT-tiny.pt"
    _openai_style_archive({k: v for k, v in state.items() if k != "attn_mask"}, archive)
    bb = load_backbone(
        BackboneSpec(model=None, pretrained=str(archive), model_config=str(tiny_clip["config"]))
    )
    ref = reference_model(tiny_clip, quick_gelu=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(ref.encode_image(pixels), dim=-1)
    torch.testing.assert_close(bb.encode_images(pixels), expected)


def test_text_encoding_matches_open_clip(tiny_clip) -> None:
    bb = load_backbone(spec(tiny_clip))
    ref = reference_model(tiny_clip)
    texts = ["a photo of a cat.", "a sketch of a dog.", "x " * 200]  # the last is truncated
    with torch.no_grad():
        expected = F.normalize(ref.encode_text(open_clip.get_tokenizer("tiny-clip")(texts)), dim=-1)
    torch.testing.assert_close(bb.encode_texts(texts, batch_size=2), expected)


def test_offline_without_cache_is_one_clear_error(tmp_path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import: a fresh interpreter sees it
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    code = (
        "from ratta.backbones import BackboneSpec, load_backbone\n"
        "from ratta.errors import RattaInputError\n"
        "try:\n"
        "    load_backbone(BackboneSpec(model='ViT-B-16', pretrained='openai'))\n"
        "except RattaInputError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    message = proc.stdout.strip()
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "--pretrained PATH" in message
    assert proc.stderr.strip() == ""


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model": "ViT-Nope", "pretrained": None}, "unknown open_clip architecture"),
        ({"model": "ViT-B-16", "pretrained": "no-such-tag"}, "neither a file nor a known tag"),
        ({"model": None, "pretrained": None}, "--model is required"),
    ],
)
def test_bad_backbone_arguments(kwargs, needle) -> None:
    with pytest.raises(RattaInputError, match=needle):
        load_backbone(BackboneSpec(**kwargs))


def test_model_config_errors(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RattaInputError, match="invalid JSON"):
        load_backbone(BackboneSpec(model=None, pretrained=None, model_config=str(bad)))
    assert not os.path.exists(tmp_path / "missing.json")
    with pytest.raises(RattaInputError, match="not found"):
        load_backbone(
            BackboneSpec(model=None, pretrained=None, model_config=str(tmp_path / "missing.json"))
        )


def _small_vocab_config(folder, bpe_path: str):
    """A tiny config whose tokenizer is a 100-merge BPE file named relative to the config."""
    import gzip
    import json

    from conftest import TINY_CLIP
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt") as fh:
        merges = fh.read().split("\n")[:101]
    (folder / "vocab").mkdir()
    with gzip.open(folder / "vocab" / "bpe.txt.gz", "wt") as fh:
        fh.write("\n".join(merges))
    text_cfg = {**TINY_CLIP["text_cfg"], "vocab_size": 512 + 100 + 2}
    text_cfg["tokenizer_kwargs"] = {"bpe_path": bpe_path}
    config = folder / "small-vocab-clip.json"
    config.write_text(json.dumps({**TINY_CLIP, "text_cfg": text_cfg}))
    return config


def test_a_config_s_tokenizer_file_is_found_beside_the_config(tmp_path, monkeypatch) -> None:
    config = _small_vocab_config(tmp_path, "vocab/bpe.txt.gz")
    monkeypatch.chdir("/")
    bb = load_backbone(BackboneSpec(model=None, pretrained=None, model_config=str(config)))
    tokens = bb.tokenizer(["a photo of a xylophone"])
    assert int(tokens.max()) == 613  # end of text: the last id of the small vocabulary
    assert bb.encode_texts(["a photo of a xylophone"]).shape == (1, 32)
    assert bb.fingerprint["tokenizer_bpe_path_sha256"]


def test_a_missing_tokenizer_file_is_one_error_line(tmp_path) -> None:
    config = _small_vocab_config(tmp_path, "vocab/missing.txt.gz")
    with pytest.raises(RattaInputError, match=r"tokenizer file .*missing.txt.gz not found"):
        load_backbone(BackboneSpec(model=None, pretrained=None, model_config=str(config)))
