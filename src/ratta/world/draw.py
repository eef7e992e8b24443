"""Rendering a scene: background, clutter, the object's parts, occluders, noise, with PIL.

Everything is drawn at twice the output size and reduced by 2 (a box filter), which keeps
edges smooth at 64 x 64. A scene carries every choice that shapes the picture, so
:func:`render` is a pure function of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from ratta.world.vocabulary import CLASSES, COLOURS, PART_COLOURS, Part

STYLES = ("photo", "drawing", "sketch")
SUPERSAMPLE = 2
_BG_VARIANTS = 8


@dataclass(frozen=True)
class Scene:
    """Everything a picture depends on.

    Attributes:
        label: index into :data:`CLASSES`.
        colour, texture, background, clutter: attribute values (keys of the tables).
        size: the attribute word; ``scale`` is the object's half-extent as a fraction of the
            image side.
        pose: the attribute word; ``angle`` the rotation in degrees.
        cx, cy: the object's centre as fractions of the image side.
        style: ``photo`` (filled, textured), ``drawing`` (clean outlines over flat fills) or
            ``sketch`` (jittery pencil outlines on paper, no fill).
        occluders: shapes drawn over the object.
        noise: standard deviation of Gaussian pixel noise (0-255 scale).
        seed: seeds the details (clutter, background variant, jitter).
    """

    label: int
    colour: str
    texture: str
    size: str
    scale: float
    pose: str
    angle: float
    background: str
    clutter: str
    cx: float
    cy: float
    style: str = "photo"
    occluders: int = 0
    noise: float = 0.0
    seed: int = 0


def _rgb(rng: np.random.Generator, base: tuple[int, int, int], spread: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-spread, spread + 1), 0, 255)) for v in base)


def _gradient(top: tuple[int, ...], bottom: tuple[int, ...], s: int) -> np.ndarray:
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(col, (s, s, 3)).copy()


def _speckle(arr: np.ndarray, rng: np.random.Generator, amount: float, scale: float) -> None:
    mask = rng.random(arr.shape[:2]) < amount
    arr[mask] += rng.normal(0, scale, (int(mask.sum()), 1)).astype(np.float32)


@cache
def background_tile(kind: str, variant: int, s: int) -> Image.Image:
    """Variant ``variant`` of a background kind, [s, s] RGB; fixed data, cached per process."""
    rng = np.random.default_rng([variant, *kind.encode()])
    if kind == "plain":
        pastel = rng.integers(200, 256, 3)
        arr = np.broadcast_to(pastel.astype(np.float32), (s, s, 3)).copy()
    elif kind == "sky":
        arr = _gradient((90 + rng.integers(0, 40), 160, 235), (215, 235, 250), s)
    elif kind == "grass":
        arr = _gradient((150, 200, 240), (200, 225, 245), s)
        horizon = int(s * (0.5 + 0.15 * rng.random()))
        arr[horizon:] = (70 + rng.integers(0, 30), 150 + rng.integers(0, 40), 60)
        _speckle(arr[horizon:], rng, 0.3, 25)
    elif kind == "sand":
        arr = np.broadcast_to(np.float32([225, 200, 150]), (s, s, 3)).copy()
        _speckle(arr, rng, 0.4, 20)
    elif kind == "water":
        arr = _gradient((60, 130, 200), (20, 60, 140), s)
        for y in rng.integers(0, s, 10):
            x = int(rng.integers(0, s - 20))
            arr[y : y + 2, x : x + 20] = (170, 210, 240)
    elif kind == "night":
        arr = _gradient((10, 15, 45), (30, 40, 90), s)
        ys, xs = rng.integers(0, s, 25), rng.integers(0, s, 25)
        arr[ys, xs] = 230
    elif kind == "brick":
        arr = np.broadcast_to(np.float32([170, 80, 60]), (s, s, 3)).copy()
        h = s // 8
        for row in range(8):
            arr[row * h : row * h + 2] = 215
            off = (h if row % 2 else 0) + int(rng.integers(0, 4))
            for x in range(off, s, 2 * h):
                arr[row * h : (row + 1) * h, x : x + 2] = 215
        _speckle(arr, rng, 0.2, 15)
    elif kind == "wood":
        arr = np.broadcast_to(np.float32([165, 115, 70]), (s, s, 3)).copy()
        for y in rng.integers(0, s, 14):
            arr[y : y + 1] -= 35
        _speckle(arr, rng, 0.2, 10)
    elif kind == "snow":
        arr = _gradient((200, 215, 235), (245, 248, 252), s)
        _speckle(arr, rng, 0.05, 30)
    elif kind == "paper":
        arr = np.broadcast_to(np.float32([250, 248, 240]), (s, s, 3)).copy()
        _speckle(arr, rng, 0.1, 6)
    else:
        raise ValueError(f"unknown background '{kind}'")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@cache
def texture_tile(colour: str, texture: str, s: int) -> Image.Image:
    """A [s, s] RGB fill of ``colour`` with the pattern ``texture`` (cached per process)."""
    base = np.array(COLOURS[colour], np.float32)
    other = np.where(base.mean() > 128, base * 0.55, np.minimum(base + 110, 255))
    arr = np.broadcast_to(base, (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s]
    period = s // 8
    if texture == "striped":
        arr[(xx + yy) % period < period // 2] = other
    elif texture == "dotted":
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        arr[cy**2 + cx**2 < (period / 4) ** 2] = other
    elif texture == "checkered":
        arr[((yy // period) + (xx // period)) % 2 == 0] = other
    return Image.fromarray(arr.astype(np.uint8))


def _transform(points: tuple, scene: Scene, s: int) -> list[tuple[float, float]]:
    a = math.radians(scene.angle)
    ca, sa = math.cos(a), math.sin(a)
    k = scene.scale * s
    return [
        (scene.cx * s + k * (x * ca - y * sa), scene.cy * s + k * (x * sa + y * ca))
        for x, y in points
    ]


def _clutter(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, s: int, big: bool
) -> None:
    for _ in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(0.08, 0.15) * s if big else rng.uniform(0.02, 0.07) * s
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == 1:
            draw.rectangle((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
        else:
            draw.line((x - r, y - r, x + r, y + r), fill=colour, width=max(1, int(r / 3)))


def _draw_part(
    img: Image.Image, draw: ImageDraw.ImageDraw, part: Part, pts: list, scene: Scene, s: int
) -> None:
    width = max(1, round(part.width * scene.scale * s))
    if part.role == "main":
        colour = COLOURS[scene.colour]
        if part.width:
            draw.line(pts, fill=colour, width=width, joint="curve")
        elif scene.texture == "plain":
            draw.polygon(pts, fill=colour)
        else:
            mask = Image.new("L", (s, s), 0)
            ImageDraw.Draw(mask).polygon(pts, fill=255)
            img.paste(texture_tile(scene.colour, scene.texture, s), (0, 0), mask)
        if not part.width:
            edge = tuple(int(v * 0.6) for v in colour)
            draw.polygon(pts, outline=edge, width=max(1, s // 64))
        return
    colour = PART_COLOURS[part.role]
    if part.width:
        draw.line(pts, fill=colour, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=colour)


def _outline_part(
    draw: ImageDraw.ImageDraw,
    part: Part,
    pts: list,
    scene: Scene,
    s: int,
    ink: tuple[int, ...],
    rng: np.random.Generator,
    fill: tuple[int, ...] | None,
) -> None:
    if scene.style == "sketch":
        jitter = 0.012 * s
        pts = [(x + rng.normal(0, jitter), y + rng.normal(0, jitter)) for x, y in pts]
    pen = max(1, round(s / 48))
    if part.width:
        draw.line(pts, fill=ink, width=max(pen, round(part.width * scene.scale * s * 0.5)))
        return
    if fill is not None:
        draw.polygon(pts, fill=fill)
    draw.line([*pts, pts[0]], fill=ink, width=pen, joint="curve")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The RGB picture of ``scene``, ``size`` x ``size``."""
    s = size * SUPERSAMPLE
    rng = np.random.default_rng(scene.seed)
    bg = "paper" if scene.style == "sketch" else scene.background
    img = background_tile(bg, int(rng.integers(_BG_VARIANTS)), s).copy()
    img = ImageChops.offset(img, int(rng.integers(s)), 0)
    draw = ImageDraw.Draw(img)
    clutter = {"none": 0, "light": int(rng.integers(3, 7)), "heavy": int(rng.integers(10, 20))}
    _clutter(draw, rng, clutter[scene.clutter], s, big=False)
    cls = CLASSES[scene.label]
    if scene.style == "photo":
        for part in cls.parts:
            _draw_part(img, draw, part, _transform(part.points, scene, s), scene, s)
    else:
        ink = (40, 40, 40) if scene.style == "drawing" else _rgb(rng, (70, 70, 90), 30)
        for part in cls.parts:
            if scene.style == "drawing":
                fill = COLOURS[scene.colour] if part.role == "main" else PART_COLOURS[part.role]
            else:
                fill = None
            pts = _transform(part.points, scene, s)
            _outline_part(draw, part, pts, scene, s, ink, rng, fill)
    _clutter(draw, rng, scene.occluders, s, big=True)
    out = img.reduce(SUPERSAMPLE)
    if scene.noise > 0:
        arr = np.asarray(out, np.float32) + rng.normal(0, scene.noise, (size, size, 3))
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out
