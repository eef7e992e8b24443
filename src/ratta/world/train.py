"""Train the world's small CLIP on the web corpus (``python benchmarks/train_world.py``).

The model is the shipped open_clip config (``ratta-world-clip.json``), randomly initialised
under the seed through ratta's own backbone loader, trained with open_clip's contrastive
loss (:class:`open_clip.ClipLoss`) on the corpus pictures and their captions, as read back
from the written shards, and saved as a float16 safetensors state dict. Augmentation is a
random resized crop (scale 0.4-1) and a horizontal flip, done for a whole batch at once
with ``roi_align``. With the same seed, settings and thread count the weights are the same
tensors (the file's metadata records the run's times; one thread by default: on a shared
machine it is also the fastest).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ratta.backbones import Backbone, load_backbone
from ratta.files import save_safetensors
from ratta.world.model import backbone_spec
from ratta.world.write import WorldSettings, write_world


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of the training run."""

    seed: int = 0
    epochs: int = 16
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    crop_scale: float = 0.4
    threads: int = 1


def read_corpus(world: str | os.PathLike[str]) -> tuple[Tensor, list[str]]:
    """The corpus of a written world: uint8 pictures [N, 3, S, S] and captions, in order."""
    manifest = json.loads((Path(world) / "world.json").read_text())
    pictures, captions = [], []
    for shard in manifest["corpus"]["shards"]:
        with tarfile.open(Path(world) / shard) as tar:
            for member in tar:
                data = tar.extractfile(member)
                assert data is not None
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(data.read())) as im:
                        pictures.append(np.asarray(im.convert("RGB")))
                else:
                    captions.append(data.read().decode())
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous(), captions


def augment(pixels: Tensor, generator: torch.Generator, scale: float, size: int) -> Tensor:
    """Random resized crops (area ``scale``-1, aspect 3/4-4/3) and flips of a uint8 batch,
    resampled bilinearly to ``size``: float [B, 3, size, size] in 0-1."""
    from torchvision.ops import roi_align

    b, _, h, w = pixels.shape
    area = torch.empty(b).uniform_(scale, 1.0, generator=generator) * h * w
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().clamp(max=w)
    ch = (area / ratio).sqrt().clamp(max=h)
    x0 = torch.rand(b, generator=generator) * (w - cw)
    y0 = torch.rand(b, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(pixels.float().div(255), boxes, (size, size), sampling_ratio=2, aligned=True)
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _normalise(x: Tensor, backbone: Backbone) -> Tensor:
    mean = torch.tensor(backbone.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocessing.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        exclude = exclude or "logit_scale" in name or "embedding" in name
        (rest if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]


def train(
    pixels: Tensor,
    captions: Sequence[str],
    settings: TrainSettings,
    *,
    progress: bool = True,
) -> tuple[Backbone, dict[str, Any]]:
    """Train the world's CLIP from random weights; returns it and a log of the run."""
    import open_clip

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(pixels, captions, settings, progress, open_clip.ClipLoss())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(
    pixels: Tensor,
    captions: Sequence[str],
    settings: TrainSettings,
    progress: bool,
    loss_fn: torch.nn.Module,
) -> tuple[Backbone, dict[str, Any]]:
    torch.manual_seed(settings.seed)
    backbone = load_backbone(backbone_spec(None))
    model = backbone.model
    tokens = backbone.tokenizer(list(captions))
    generator = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6
    )
    n = len(captions)
    steps_per_epoch = n // settings.batch_size
    total = steps_per_epoch * settings.epochs

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        done = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
        return 0.5 * settings.lr * (1 + math.cos(math.pi * done))

    model.train()
    log: dict[str, Any] = {"epochs": [], "steps": total, "images": n}
    started, cpu0 = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        losses = []
        for k in range(steps_per_epoch):
            idx = order[k * settings.batch_size : (k + 1) * settings.batch_size]
            crops = augment(
                pixels[idx], generator, settings.crop_scale, backbone.preprocessing.size
            )
            x = _normalise(crops, backbone)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            image_features, text_features, scale = model(x, tokens[idx])[:3]
            loss = loss_fn(image_features, text_features, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        elapsed = time.perf_counter() - started
        log["epochs"].append({"loss": float(np.mean(losses)), "seconds": round(elapsed, 1)})
        if progress:
            print(
                f"epoch {epoch + 1}/{settings.epochs}: loss {np.mean(losses):.3f}, "
                f"logit scale {model.logit_scale.exp().item():.1f}, {elapsed:.0f} s",
                flush=True,
            )
    model.eval()
    log["seconds"] = round(time.perf_counter() - started, 1)
    log["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    log["logit_scale"] = round(backbone.logit_scale, 3)
    return backbone, log


def save_weights(backbone: Backbone, out: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """The state dict as float16 safetensors, with ``info`` in its metadata."""
    state = {k: v.detach().half() for k, v in backbone.model.state_dict().items()}
    save_safetensors(out, state, {"ratta_world_training": json.dumps(info)})


def train_weights(
    out: str | os.PathLike[str],
    settings: TrainSettings | None = None,
    world_settings: WorldSettings | None = None,
    world: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Generate the corpus (into ``world``, or a temporary folder), train, save the weights
    to ``out`` with the run's record in their metadata; returns the record."""
    settings = settings or TrainSettings()
    world_settings = world_settings or WorldSettings()
    load = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ratta-world-") as tmp:
        folder = Path(world) if world else Path(tmp) / "world"
        write_world(folder, world_settings, workers=1)
        pixels, captions = read_corpus(folder)
    prepared = time.perf_counter() - started
    print(f"corpus: {len(captions)} pictures, ready in {prepared:.1f} s", flush=True)
    backbone, log = train(pixels, captions, settings)
    info = {
        "train": asdict(settings),
        "world": asdict(world_settings),
        "log": log,
        "prepare_seconds": round(prepared, 1),
        "load_average": {"start": [round(v, 2) for v in load], "end": os.getloadavg()},
        "torch": torch.__version__,
    }
    save_weights(backbone, out, info)
    return info
