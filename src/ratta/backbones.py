"""CLIP-like backbones through open_clip: named weights, local checkpoints, custom configs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ratta.devices import resolve_device
from ratta.errors import RattaInputError
from ratta.guard import Read
from ratta.identity import file_kind
from ratta.identity import file_sha256 as cached_file_hash
from ratta.identity import sha256_file as sha256_file

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Preprocessing:
    """What the image side of the backbone expects (open_clip's preprocess config)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: an open_clip model name with a weight tag or a local file.

    Attributes:
        model: open_clip architecture name (``ViT-B-16``), or ``None`` with ``model_config``.
        pretrained: an open_clip tag (``openai``) or a path to a checkpoint (open_clip state
            dict, ``.safetensors``, or an OpenAI CLIP ``.pt`` archive).
        model_config: a JSON architecture config (open_clip's format) for custom models.
        precision: fp32, or fp16/bf16 autocast (CUDA only).
    """

    model: str | None = "ViT-B-16"
    pretrained: str | None = "openai"
    model_config: str | None = None
    precision: str = "fp32"

    def reads(self) -> list[Read]:
        """The local files this backbone is built from (inputs no output may replace)."""
        checkpoint = self.pretrained if self.pretrained and Path(self.pretrained).exists() else None
        return [*Read.of(checkpoint, "--pretrained"), *Read.of(self.model_config, "--model-config")]


def _is_openai_archive(path: Path) -> bool:
    """OpenAI CLIP checkpoints are TorchScript zip archives (with a ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


_NOT_CHECKPOINT = {
    "empty": "an empty file (0 bytes)",
    "text": "a text file, not a checkpoint",
    "binary": "not a checkpoint (neither safetensors nor a torch file)",
}


def checkpoint_kind(path: Path) -> str | None:
    """What a local weights file is instead of a checkpoint, for the error line; ``None``
    for a file open_clip can read (a torch zip or TorchScript archive, a pickle, a
    safetensors file)."""
    with open(path, "rb") as fh:
        return _NOT_CHECKPOINT.get(file_kind(fh.read(9)))


def resolve_model_name(spec: BackboneSpec) -> str:
    """The open_clip name of the architecture, registering ``model_config`` if given."""
    import open_clip

    if spec.model_config:
        cfg_path = Path(spec.model_config)
        if not cfg_path.is_file():
            raise RattaInputError(f"--model-config {cfg_path}: file not found")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise RattaInputError(f"--model-config {cfg_path}: invalid JSON ({exc})") from None
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise RattaInputError(
                f"--model-config {cfg_path}: expected open_clip's format with "
                "'embed_dim', 'vision_cfg' and 'text_cfg'"
            )
        open_clip.add_model_config(cfg_path)
        name = cfg_path.stem
        if spec.model and spec.model != name:
            raise RattaInputError(
                f"--model {spec.model} does not match --model-config {cfg_path} (its name is "
                f"'{name}', the file's stem); drop --model or rename the file"
            )
        return name
    if not spec.model:
        raise RattaInputError("--model is required (or --model-config for a custom architecture)")
    name = spec.model.replace("/", "-")
    if name not in open_clip.list_models():
        raise RattaInputError(
            f"--model {spec.model}: unknown open_clip architecture "
            "(see open_clip.list_models(), or pass --model-config)"
        )
    return name


def check_precision(spec: BackboneSpec, device: str | torch.device) -> None:
    """Refuse a precision that would not be what runs: autocast applies on CUDA only."""
    if spec.precision not in PRECISIONS:
        raise RattaInputError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if spec.precision != "fp32" and torch.device(device).type != "cuda":
        raise RattaInputError(
            f"--precision {spec.precision}: autocast applies on CUDA only, so on "
            f"{torch.device(device).type} the model would run in fp32; use --precision fp32 "
            "(or --device cuda)"
        )


def embed_dim(spec: BackboneSpec) -> int | None:
    """The embedding dimension of the architecture, read from its config (no weights)."""
    import open_clip

    cfg = open_clip.get_model_config(resolve_model_name(spec))
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def tokenizer_files(spec: BackboneSpec) -> dict[str, str]:
    """The tokenizer files a custom config names, as absolute paths (open_clip's kwargs).

    A config's ``text_cfg.tokenizer_kwargs.bpe_path`` (a BPE merges file for open_clip's
    ``SimpleTokenizer``, e.g. a smaller vocabulary) is relative to the config's folder, so
    that a config and its vocabulary can be shipped together.
    """
    if not spec.model_config:
        return {}
    cfg_path = Path(spec.model_config)
    cfg = json.loads(cfg_path.read_text())  # resolve_model_name has validated it
    bpe = ((cfg.get("text_cfg") or {}).get("tokenizer_kwargs") or {}).get("bpe_path")
    if bpe is None:
        return {}
    path = cfg_path.parent / bpe
    if not path.is_file():
        raise RattaInputError(f"--model-config {cfg_path}: tokenizer file {path} not found")
    return {"bpe_path": str(path.resolve())}


def backbone_fingerprint(
    spec: BackboneSpec, device: str | torch.device = "cpu", tf32: bool = False
) -> dict[str, Any]:
    """What identifies the embeddings a backbone computes: architecture (and config
    content), tag or file hash, the precision that actually runs (autocast applies on CUDA
    only), the kind of device (CPU and GPU kernels round differently) and, on CUDA, TF32
    when it is allowed (``--tf32``: products rounded to 10 mantissa bits)."""
    kind = torch.device(device).type
    precision = spec.precision if kind == "cuda" else "fp32"
    fp: dict[str, Any] = {"model": resolve_model_name(spec), "precision": precision}
    fp["device"] = kind
    if tf32 and kind == "cuda":
        fp["tf32"] = True
    if spec.model_config:
        fp["model_config_sha256"] = cached_file_hash(spec.model_config)
        for key, path in tokenizer_files(spec).items():
            fp[f"tokenizer_{key}_sha256"] = cached_file_hash(path)
    if spec.pretrained and Path(spec.pretrained).is_file():
        fp["checkpoint_sha256"] = cached_file_hash(spec.pretrained)
    else:
        fp["pretrained"] = spec.pretrained
    return fp


@dataclass
class Backbone:
    """A loaded CLIP-like model with its tokenizer and image preprocessing."""

    model: torch.nn.Module
    tokenizer: Any
    preprocessing: Preprocessing
    spec: BackboneSpec
    device: torch.device
    fingerprint: dict[str, Any]

    @property
    def precision(self) -> str:
        """The precision the encoding device runs: fp16/bf16 autocast on CUDA only."""
        return str(self.fingerprint["precision"])

    def identity(self, tf32: bool = False) -> dict[str, Any]:
        """The fingerprint of what this backbone computes, with ``tf32`` when TF32 is
        allowed on CUDA (as :func:`backbone_fingerprint`)."""
        on_cuda = self.fingerprint["device"] == "cuda"
        return {**self.fingerprint, **({"tf32": True} if tf32 and on_cuda else {})}

    @property
    def logit_scale(self) -> float:
        """The multiplier s = exp(logit_scale) of the model."""
        return float(self.model.logit_scale.detach().float().exp().cpu())

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.device.type == "cuda" and self.spec.precision in _AUTOCAST:
            with torch.autocast("cuda", dtype=_AUTOCAST[self.spec.precision]):
                yield
        else:
            yield

    @torch.inference_mode()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings [B, d] of normalised pixels [B, 3, S, S]."""
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        on_batch: Callable[[int], object] | None = None,
    ) -> Tensor:
        """L2-normalised float32 text embeddings [T, d] (texts truncated to the context).

        ``on_batch(n)`` is called after each batch of n texts (a progress bar's update).
        """
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            with self._autocast():
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
            if on_batch is not None:
                on_batch(tokens.shape[0])
        return torch.cat(out).cpu() if out else torch.empty(0)


def _local_weights(name: str, tag: str) -> str:
    """The cached file of a weight tag, so that loading needs no network (open_clip would
    ask the hub first, and retry for ~50 s when offline); else the tag itself, after
    checking within seconds that the hub can be reached."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        stem = filename.rsplit(".", 1)[0]
        for candidate in (f"{stem}.safetensors", "open_clip_model.safetensors", filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found
        host = "huggingface.co"
    elif url:
        cached = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if cached.is_file():
            return str(cached)
        host = urllib.parse.urlsplit(url).hostname or ""
    else:
        return tag
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        why = "HF_HUB_OFFLINE=1 is set"
    elif not _reachable(host):
        why = f"{host} cannot be reached (offline?)"
    else:
        return tag
    raise RattaInputError(
        f"--pretrained {tag}: the {name} weights are not cached and {why}: download them "
        "once on a connected machine, or pass --pretrained PATH to a local checkpoint"
    )


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included,
    which has no timeout of its own: it runs in a daemon thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs its failures on the root logger; ours is the one error line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # TorchScript deprecation notes while loading archives
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logging.disable(previous)


def load_backbone(
    spec: BackboneSpec,
    device: str | torch.device = "cpu",
    *,
    runs_on: str | torch.device | None = None,
) -> Backbone:
    """Build the model of ``spec`` on ``device`` (open_clip's normal download and cache for tags).

    A local checkpoint never touches the network. Failure to obtain weights (unknown tag,
    offline without a cached copy) or a device this machine does not have is one
    ``RattaInputError`` line. ``runs_on``: the device that will encode, when it is not
    ``device`` (Ray workers get a copy of a model loaded on the driver's CPU); it is the
    device of the fingerprint.
    """
    import open_clip

    dev = resolve_device(device)
    encoder = torch.device(runs_on) if runs_on is not None else dev
    check_precision(spec, encoder)
    name = resolve_model_name(spec)
    tokenizer_kwargs = tokenizer_files(spec)
    kwargs: dict[str, Any] = {}
    pretrained = spec.pretrained
    if pretrained and Path(pretrained).is_file():
        if kind := checkpoint_kind(Path(pretrained)):
            raise RattaInputError(f"--pretrained {pretrained}: {kind}")
        if _is_openai_archive(Path(pretrained)):
            kwargs["force_quick_gelu"] = True  # every OpenAI CLIP model uses QuickGELU
            kwargs["weights_only"] = False  # TorchScript archives hold code, not only tensors
    elif pretrained:
        if not open_clip.get_pretrained_cfg(name, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise RattaInputError(
                f"--pretrained {pretrained}: neither a file nor a known tag for {name} "
                f"(known tags: {tags})"
            )
        if open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        pretrained = _local_weights(name, pretrained)
    try:
        with _quiet_logging():
            model = open_clip.create_model(
                name, pretrained=pretrained or None, device=dev, **kwargs
            )
    except Exception as exc:  # open_clip raises many types for download/load failures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1 and the weights are not cached: pass --pretrained PATH)"
        raise RattaInputError(
            f"could not load backbone {name} with weights '{pretrained}': {first}{hint}"
        ) from None
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = Preprocessing(
        size=int(size),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )
    fp = backbone_fingerprint(spec, encoder)
    fp["preprocessing"] = asdict(pre)
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(name, **tokenizer_kwargs),
        preprocessing=pre,
        spec=spec,
        device=dev,
        fingerprint=fp,
    )
