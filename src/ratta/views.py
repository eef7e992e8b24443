"""Test-image preprocessing: the center crop x_0 and V random views, seeded per image.

Both stay uint8 [3, S, S] until they reach the model's device, where :func:`normalise`
applies ToTensor's /255 and CLIP's mean/std (the same float32 operations as torchvision's
``ToTensor`` + ``Normalize``); this keeps worker-to-main traffic 4x smaller.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ratta.backbones import Preprocessing

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def to_uint8(img: Image.Image) -> Tensor:
    """PIL RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def center_transform(pre: Preprocessing) -> T.Compose:
    """Resize the shorter side to S (model interpolation, bicubic for CLIP), center crop S."""
    return T.Compose(
        [
            T.Resize(pre.size, interpolation=_INTERPOLATION[pre.interpolation]),
            T.CenterCrop(pre.size),
        ]
    )


def view_transform(size: int) -> T.Compose:
    """RandomResizedCrop(S) with torchvision's defaults, then a random horizontal flip."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for test image ``index`` under run seed ``seed``."""
    digest = hashlib.sha256(f"ratta-views:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def crops(img: Image.Image, pre: Preprocessing, views: int, seed: int, index: int) -> Tensor:
    """uint8 [1 + V, 3, S, S]: the center crop, then V random views of ``img`` (RGB).

    The views depend only on (seed, index), never on batching or worker processes.
    """
    out = torch.empty(1 + views, 3, pre.size, pre.size, dtype=torch.uint8)
    out[0] = to_uint8(center_transform(pre)(img))
    if views:
        aug = view_transform(pre.size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(seed, index))
            for v in range(views):
                out[1 + v] = to_uint8(aug(img))
    return out


def pixel_stats(pre: Preprocessing, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """CLIP's mean and std as [3, 1, 1] float32 tensors on ``device`` (made once per run:
    building them per batch would copy them to a GPU every time)."""
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1).to(device)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1).to(device)
    return mean, std


def normalise(
    pixels: Tensor, pre: Preprocessing, stats: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """uint8 [..., 3, S, S] -> float32 (x / 255 - mean) / std on the tensor's device.

    ``stats``: :func:`pixel_stats` of ``pre`` on that device, if already made.
    """
    x = pixels.to(torch.float32).div(255)
    mean, std = stats if stats is not None else pixel_stats(pre, x.device)
    return x.sub_(mean).div_(std)
