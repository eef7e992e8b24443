"""Text features: exact composition, equality with open_clip, published descriptions."""

from __future__ import annotations

import http.server
import json
import threading
from typing import ClassVar

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ratta.errors import RattaInputError
from ratta.files import load_text
from ratta.presets import get_preset
from ratta.text import build_text_features, compose_prompts, fetch_published_descriptions

NAMES = ["banded", "blotchy", "woven fabric"]
DESCRIPTIONS = {
    "banded": ["Stripes of colour.", "Parallel bands."],
    "blotchy": ["Irregular spots.", "Patchy colour.", "Uneven marks."],
    "woven_fabric": ["Interlaced threads."],  # matched to 'woven fabric'
}


@pytest.fixture()
def desc_file(tmp_path):
    path = tmp_path / "CuPL_prompts_dtd.json"
    path.write_text(json.dumps(DESCRIPTIONS))
    return path


def test_composition_follows_the_reference() -> None:
    dtd = get_preset("dtd")
    per_class = [DESCRIPTIONS["banded"], DESCRIPTIONS["blotchy"], None]
    prompts = compose_prompts([*NAMES[:2], "woven fabric"], per_class, dtd.templates, dtd.pre)
    assert prompts.classifier_texts[0] == [
        "a photo of a banded, a type of texture.",
        "a photo of the banded, a type of texture.",
        "Stripes of colour.",
        "Parallel bands.",
    ]
    pre = "a photo of a blotchy, which is a type of texture, or a type of pattern."
    assert prompts.desc_texts[1] == [
        f"{pre} Irregular spots.",
        f"{pre} Patchy colour.",
        f"{pre} Uneven marks.",
        pre,
    ]
    # a class without descriptions uses its filled templates as descriptions
    assert prompts.desc_texts[2][0].endswith(
        "pattern. a photo of a woven fabric, a type of texture."
    )


def test_text_file_matches_open_clip(tiny_backbone, tiny_clip, desc_file, tmp_path) -> None:
    dtd = get_preset("dtd")
    out = tmp_path / "text.safetensors"
    build_text_features(NAMES, desc_file, dtd.templates, dtd.pre, tiny_backbone, out)
    text = load_text(out)
    assert text.class_names == NAMES
    assert text.desc_class.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    model = open_clip.create_model("tiny-clip", pretrained=str(tiny_clip["checkpoint"])).eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    own = [DESCRIPTIONS["banded"], DESCRIPTIONS["blotchy"], DESCRIPTIONS["woven_fabric"]]
    with torch.no_grad():
        for c, name in enumerate(NAMES):
            texts = [t.format(name) for t in dtd.templates] + own[c]
            emb = F.normalize(model.encode_text(tok(texts)), dim=-1)
            w = F.normalize(emb.mean(0), dim=0)
            assert float(w @ text.classifier[c]) >= 0.999
            head = dtd.pre.format(name)
            rows = [head + d for d in own[c]] + [head[:-1]]
            expected = F.normalize(model.encode_text(tok(rows)), dim=-1)
            got = text.desc[text.desc_class == c]
            assert bool(((got * expected).sum(1) >= 0.999).all())
    assert text.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    meta = json.loads(load_file_meta(out)["ratta_text"])
    assert meta["pre"] == dtd.pre and meta["templates"] == list(dtd.templates)


def load_file_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_missing_classes_are_listed(tiny_backbone, tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"banded": ["x y z."]}))
    dtd = get_preset("dtd")
    with pytest.raises(RattaInputError) as err:
        build_text_features(NAMES, path, dtd.templates, dtd.pre, tiny_backbone, tmp_path / "t.st")
    assert "'blotchy'" in str(err.value) and "'woven fabric'" in str(err.value)
    assert "--allow-missing" in str(err.value) and not (tmp_path / "t.st").exists()
    summary = build_text_features(
        NAMES, path, dtd.templates, dtd.pre, tiny_backbone, tmp_path / "t.st", allow_missing=True
    )
    assert summary["missing_classes"] == ["blotchy", "woven fabric"]
    assert load_file(str(tmp_path / "t.st"))["desc_class"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]


def test_malformed_descriptions_file(tiny_backbone, tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"banded": "not a list"}))
    dtd = get_preset("dtd")
    with pytest.raises(RattaInputError, match="CuPL JSON"):
        build_text_features(NAMES, path, dtd.templates, dtd.pre, tiny_backbone, tmp_path / "t.st")


class _Files(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Files.requests.append(self.path)
        if self.path.endswith("CuPL_prompts_dtd.json"):
            body = json.dumps(DESCRIPTIONS).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


def test_auto_descriptions_download_once_into_the_cache(tmp_path, monkeypatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RATTA_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("RATTA_DESCRIPTIONS_URL", f"http://127.0.0.1:{server.server_port}/d")
        first = fetch_published_descriptions("dtd")
        second = fetch_published_descriptions("dtd")
        assert first == second == tmp_path / "cache" / "descriptions" / "CuPL_prompts_dtd.json"
        assert json.loads(first.read_text()) == DESCRIPTIONS
        assert _Files.requests == ["/d/CuPL_prompts_dtd.json"]
        with pytest.raises(RattaInputError, match="could not download"):
            fetch_published_descriptions("food101")
    finally:
        server.shutdown()


def test_baseline_classifiers_match_open_clip(
    tiny_backbone, tiny_clip, desc_file, tmp_path
) -> None:
    dtd = get_preset("dtd")
    out = tmp_path / "text.safetensors"
    build_text_features(NAMES, desc_file, dtd.templates, dtd.pre, tiny_backbone, out)
    text = load_text(out)
    model = open_clip.create_model("tiny-clip", pretrained=str(tiny_clip["checkpoint"])).eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        single = F.normalize(model.encode_text(tok([f"a photo of a {n}." for n in NAMES])), dim=-1)
        ensemble = torch.stack(
            [
                F.normalize(
                    F.normalize(
                        model.encode_text(tok([t.format(n) for t in dtd.templates])), dim=-1
                    ).mean(0),
                    dim=0,
                )
                for n in NAMES
            ]
        )
    assert bool(((text.baselines["single_template"] * single).sum(1) >= 0.999).all())
    assert bool(((text.baselines["template_ensemble"] * ensemble).sum(1) >= 0.999).all())


def test_peer_classifiers_match_open_clip_and_each_text_is_encoded_once(
    tiny_backbone, tiny_clip, desc_file, tmp_path, monkeypatch
) -> None:
    dtd = get_preset("dtd")
    encoded: list[str] = []
    real = tiny_backbone.encode_texts

    def counting(texts, *args, **kwargs):
        encoded.extend(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "encode_texts", counting)
    out = tmp_path / "text.safetensors"
    summary = build_text_features(
        NAMES, desc_file, dtd.templates, dtd.pre, tiny_backbone, out, peers="dtd"
    )
    assert len(encoded) == len(set(encoded)) == summary["texts_encoded"]
    text = load_text(out)
    assert sorted(text.baselines) == [
        "peer_dmn",
        "peer_single",
        "peer_tda",
        "single_template",
        "template_ensemble",
    ]
    model = open_clip.create_model("tiny-clip", pretrained=str(tiny_clip["checkpoint"])).eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    own = [DESCRIPTIONS["banded"], DESCRIPTIONS["blotchy"], DESCRIPTIONS["woven_fabric"]]
    with torch.no_grad():
        for c, name in enumerate(NAMES):
            for key, texts in (
                ("peer_single", [f"a photo of a {name}."]),
                ("peer_tda", [f"{name} texture."]),
                ("peer_dmn", [f"{name} texture.", *own[c]]),  # TDA's template + CuPL
            ):
                emb = F.normalize(model.encode_text(tok(texts)), dim=-1)
                w = F.normalize(emb.mean(0), dim=0)
                assert float(w @ text.baselines[key][c]) >= 0.999, (key, name)
    # without a dataset for the peers (a library call), only the two CLIP baselines
    build_text_features(NAMES, desc_file, dtd.templates, dtd.pre, tiny_backbone, out)
    assert sorted(load_text(out).baselines) == ["single_template", "template_ensemble"]
