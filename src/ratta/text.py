"""The text stage: class names + CuPL descriptions -> text features file.

W_c = normalise(mean_t normalise(g(t))) over every hand template of the dataset filled with
the class name and every raw description of the class (the CuPL classifier); the description
rows of class c are ``pre.format(name) + desc`` for each description, then the bare
``pre.format(name)`` without its trailing space. Zero-shot classifiers to compare against are
stored beside it (:func:`baseline_prompts`): CLIP's single template, the hand-template
ensemble, and the paper classifiers of the training-free peers (``ratta.peers``).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ratta.backbones import Backbone
from ratta.devices import compute_info, numerics
from ratta.errors import RattaInputError
from ratta.files import TextFeatures, atomic_path, save_text, write_json
from ratta.guard import Read, Write, guarded, output_files
from ratta.peers.prompts import paper_classifier_prompts
from ratta.progress import Progress, progress_bar
from ratta.provenance import stamp

# The reference repository's published CuPL files: <base>/CuPL_prompts_<stem>.json
DESCRIPTIONS_URL = "https://raw.githubusercontent.com/kaist-dmlab/RA-TTA/main/descriptions"


def cache_dir() -> Path:
    """ratta's cache root: $RATTA_CACHE, else $XDG_CACHE_HOME/ratta, else ~/.cache/ratta."""
    if os.environ.get("RATTA_CACHE"):
        return Path(os.environ["RATTA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ratta"


def fetch_published_descriptions(stem: str) -> Path:
    """Download ``CuPL_prompts_<stem>.json`` of the reference repository once, into the cache.

    The base address can be overridden with $RATTA_DESCRIPTIONS_URL (mirrors, tests).
    """
    target = cache_dir() / "descriptions" / f"CuPL_prompts_{stem}.json"
    if target.is_file():
        return target
    base = os.environ.get("RATTA_DESCRIPTIONS_URL", DESCRIPTIONS_URL).rstrip("/")
    url = f"{base}/CuPL_prompts_{stem}.json"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            payload = resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RattaInputError(
            f"--descriptions auto: could not download {url} ({reason}); "
            "download it yourself and pass --descriptions FILE"
        ) from None
    try:
        json.loads(payload)
    except json.JSONDecodeError:
        raise RattaInputError(f"--descriptions auto: {url} is not JSON") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)
    return target


def load_descriptions(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a CuPL JSON file: an object mapping class name -> list of strings."""
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"--descriptions {p}: file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RattaInputError(f"--descriptions {p}: invalid JSON ({exc})") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    )
    if not ok:
        raise RattaInputError(
            f"--descriptions {p}: expected a CuPL JSON object (class name -> list of strings)"
        )
    return data


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def match_descriptions(
    class_names: Sequence[str],
    descriptions: dict[str, list[str]],
    source: str,
    allow_missing: bool = False,
) -> tuple[list[list[str] | None], list[str]]:
    """Descriptions per class in class order (exact key, else case/underscore-insensitive).

    Returns the lists (``None`` for a class without descriptions when ``allow_missing``) and
    the names of the missing classes; without ``allow_missing`` they are an error.
    """
    loose = {_key(k): v for k, v in descriptions.items()}
    found: list[list[str] | None] = []
    missing: list[str] = []
    for name in class_names:
        desc = descriptions.get(name, loose.get(_key(name)))
        if not desc:
            missing.append(name)
            desc = None
        found.append(desc)
    if missing and not allow_missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise RattaInputError(
            f"{source}: no descriptions for {len(missing)} classes: {shown}{more} "
            "(--allow-missing uses the hand templates for them)"
        )
    return found, missing


@dataclass(frozen=True)
class TextPrompts:
    """The texts to encode: per class, classifier texts and description rows."""

    classifier_texts: list[list[str]]
    desc_texts: list[list[str]]

    @property
    def desc_rows(self) -> list[str]:
        """The description texts in row order (class by class): the rows of ``desc``."""
        return [t for texts in self.desc_texts for t in texts]


def compose_prompts(
    class_names: Sequence[str],
    descriptions: Sequence[list[str] | None],
    templates: Sequence[str],
    pre: str,
) -> TextPrompts:
    """The reference composition; a class without descriptions uses its filled templates."""
    cls_texts, desc_texts = [], []
    for name, desc in zip(class_names, descriptions, strict=True):
        filled = [t.format(name) for t in templates]
        own = list(desc) if desc else filled
        cls_texts.append(filled + own)
        head = pre.format(name)
        desc_texts.append([head + d for d in own] + [head.removesuffix(" ")])
    return TextPrompts(cls_texts, desc_texts)


class TextEncoder:
    """g(t) of texts, L2-normalised, each distinct text encoded once per text stage (the CuPL
    sentences of DMN-ZS's classifier are the CuPL classifier's, the single template of the
    CLIP baseline often ZERO's).

    ``on_batch(n)``: called after each batch of n texts encoded.
    """

    def __init__(self, backbone: Backbone, on_batch: Callable[[int], object] | None = None) -> None:
        self.backbone = backbone
        self.on_batch = on_batch
        self.seen: dict[str, torch.Tensor] = {}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[T, d], one row per text (repeated texts repeat their row)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            emb = self.backbone.encode_texts(new, on_batch=self.on_batch)
            self.seen.update(zip(new, emb, strict=True))
        return torch.stack([self.seen[t] for t in texts])

    def classifier(self, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """[C, d]: row c = normalise(mean_t g(t)) over class c's prompts."""
        return F.normalize(torch.stack([self.encode(texts).mean(0) for texts in prompts]), dim=-1)


SINGLE_TEMPLATE = "a photo of a {}."


def baseline_prompts(
    class_names: Sequence[str],
    templates: Sequence[str],
    peers: str | None = None,
    sentences: Sequence[Sequence[str] | None] = (),
) -> dict[str, list[list[str]]]:
    """Per class, the prompts of the zero-shot classifiers to compare against.

    ``single_template``: 'a photo of a {name}.'; ``template_ensemble``: the dataset's hand
    templates (CLIP's prompt ensembling). With ``peers`` (a dataset name), also the paper
    classifiers of the training-free peers on it (:func:`ratta.peers.prompts.
    paper_classifier_prompts`: ``peer_single``, ``peer_tda``, ``peer_dmn``, the last with
    ``sentences``, each class's CuPL sentences).
    """
    prompts = {
        "single_template": [[SINGLE_TEMPLATE.format(n)] for n in class_names],
        "template_ensemble": [[t.format(n) for t in templates] for n in class_names],
    }
    if peers is not None:
        prompts |= paper_classifier_prompts(peers, class_names, sentences)
    return prompts


def _plan(
    descriptions_file: str | os.PathLike[str],
    backbone: Backbone,
    out: str | os.PathLike[str],
    reads: Sequence[Read],
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    inputs = Read.of(descriptions_file, "--descriptions") + backbone.spec.reads()
    return output_files(out)[:2], [*inputs, *reads]


@guarded(_plan)
def build_text_features(
    class_names: Sequence[str],
    descriptions_file: str | os.PathLike[str],
    templates: Sequence[str],
    pre: str,
    backbone: Backbone,
    out: str | os.PathLike[str],
    *,
    allow_missing: bool = False,
    metadata: dict[str, Any] | None = None,
    reads: Sequence[Read] = (),
    progress: Progress = False,
    tf32: bool = False,
    peers: str | None = None,
) -> dict[str, Any]:
    """Write the text features file ``out`` (and ``out.json``); returns the summary.

    Besides the CuPL classifier and the description rows, the file holds the baseline
    classifiers of :func:`baseline_prompts` (``baseline_<name>``); ``peers``: the dataset
    whose peers' paper classifiers are added (its name, or its preset's for custom data).
    ``reads``: further inputs no output may replace (the files the class names came from).
    ``progress``: a bar over the texts encoded (see :mod:`ratta.progress`). ``tf32``: on
    CUDA, let float32 products round to TF32 (off by default,
    :func:`ratta.devices.numerics`). The summary's ``compute`` holds the device and the
    precision actually used.
    """
    out_path = Path(out)
    descriptions = load_descriptions(descriptions_file)
    per_class, missing = match_descriptions(
        class_names, descriptions, str(descriptions_file), allow_missing
    )
    prompts = compose_prompts(class_names, per_class, templates, pre)
    extra = baseline_prompts(class_names, templates, peers, per_class)
    groups = [prompts.classifier_texts, prompts.desc_texts, *extra.values()]
    texts = len({t for group in groups for rows in group for t in rows})
    with numerics(tf32), progress_bar(progress, "text", total=texts, unit="text") as bar:
        encoder = TextEncoder(backbone, bar.update)
        classifier = encoder.classifier(prompts.classifier_texts)
        desc = encoder.encode(prompts.desc_rows)
        baselines = {name: encoder.classifier(rows) for name, rows in extra.items()}
    desc_class = torch.repeat_interleave(
        torch.arange(len(class_names)), torch.tensor([len(t) for t in prompts.desc_texts])
    )
    desc_hash = hashlib.sha256(Path(descriptions_file).read_bytes()).hexdigest()
    info = {
        "backbone": backbone.identity(tf32),
        "descriptions": str(descriptions_file),
        "descriptions_sha256": desc_hash,
        "templates": list(templates),
        "pre": pre,
        "missing_classes": missing,
        "peers": peers,
        **(metadata or {}),
    }
    text = TextFeatures(
        classifier=classifier,
        desc=desc,
        desc_class=desc_class,
        logit_scale=backbone.logit_scale,
        class_names=list(class_names),
        baselines=baselines,
        desc_texts=prompts.desc_rows,
    )
    save_text(out_path, text, {"ratta_text": json.dumps(info)})
    summary = {
        **stamp(),
        "output": str(out_path),
        "classes": len(class_names),
        "description_rows": int(desc.shape[0]),
        "classifier_texts": sum(len(t) for t in prompts.classifier_texts),
        "baselines": {name: sum(map(len, rows)) for name, rows in extra.items()},
        "texts_encoded": texts,
        "logit_scale": text.logit_scale,
        "compute": compute_info(backbone.device, backbone.precision, tf32),
        **info,
    }
    write_json(Path(f"{out_path}.json"), summary)
    return summary
