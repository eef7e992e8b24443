"""What the world's pictures show and what their texts say: scenes, captions, descriptions.

Corpus scenes follow each class's typical attributes (colour, background, texture, upright
pose) most of the time, as web pictures do; their captions name the class and some of the
attributes, with web noise (no class name, a wrong one, junk). Test scenes come from a
shifted domain in three kinds (:data:`SHIFTS`): pencil sketches, photos with atypical
colours, backgrounds and poses, and small objects among heavy clutter, occluders and noise.
Class descriptions are written from the attribute tables, like LLM answers in CuPL files.
"""

from __future__ import annotations

import re

import numpy as np

from ratta.world.draw import Scene
from ratta.world.vocabulary import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    TEXTURES,
    ObjectClass,
)

SHIFTS = ("sketch", "atypical", "occluded")
_SCALES = {"small": (0.22, 0.28), "medium": (0.3, 0.37), "large": (0.38, 0.46)}


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _angle(rng: np.random.Generator, pose: str) -> float:
    jitter = float(rng.uniform(-8, 8))
    sign = 1 if rng.random() < 0.5 else -1
    base = {"upright": 0.0, "tilted": sign * rng.uniform(20, 40), "upside down": 180.0}
    return float(base.get(pose, sign * 90.0)) + jitter


def _placed(
    rng: np.random.Generator, label: int, size: str, pose: str, spread: float = 0.8, **kw
) -> Scene:
    lo, hi = _SCALES[size]
    scale = float(rng.uniform(lo, hi))
    room = (0.5 - scale) * spread
    cx, cy = 0.5 + rng.uniform(-room, room, 2)
    return Scene(
        label=label,
        size=size,
        scale=scale,
        pose=pose,
        angle=_angle(rng, pose),
        cx=float(cx),
        cy=float(cy),
        seed=int(rng.integers(1 << 62)),
        **kw,
    )


def class_weights(seed: int) -> np.ndarray:
    """Class frequencies of the corpus: a mild long tail (the most common class 4x the rarest),
    with the order of classes drawn from ``seed``."""
    rank = np.random.default_rng([seed, 7]).permutation(len(CLASSES))
    w = 1.0 / (1.0 + rank / (len(CLASSES) / 3))
    return w / w.sum()


def corpus_scene(rng: np.random.Generator, label: int) -> Scene:
    """A web picture of class ``label``: mostly typical attributes, sometimes a drawing."""
    cls = CLASSES[label]
    # typical attributes only a third of the time (else any): what a small model learns
    # first must be the shape, not the colour or the background
    colour = _pick(rng, cls.colours) if rng.random() < 0.3 else _pick(rng, tuple(COLOURS))
    roll = rng.random()
    texture = cls.texture if roll < 0.4 else "plain" if roll < 0.7 else _pick(rng, TEXTURES)
    background = (
        _pick(rng, cls.backgrounds) if rng.random() < 0.25 else _pick(rng, tuple(BACKGROUNDS))
    )
    if cls.upright:
        pose = _pick(rng, ("upright",) * 16 + ("tilted",) * 3 + ("upside down",))
    else:
        pose = _pick(rng, ("upright", "tilted", "sideways", "upside down"))
    return _placed(
        rng,
        label,
        _pick(rng, ("small", "medium", "large")),
        pose,
        colour=colour,
        texture=texture,
        background=background,
        clutter=_pick(rng, ("none",) * 6 + ("light",) * 3 + ("heavy",)),
        style=_pick(rng, ("photo",) * 17 + ("drawing",) * 2 + ("sketch",)),
    )


def shifted_scene(rng: np.random.Generator, label: int, shift: str) -> Scene:
    """A picture of class ``label`` from the shifted test domain (one of :data:`SHIFTS`)."""
    cls = CLASSES[label]
    poses = ("upright", "tilted", "upside down", "sideways")
    if shift == "sketch":
        return _placed(
            rng,
            label,
            _pick(rng, ("medium", "large")),
            _pick(rng, ("upright", "upright", "tilted")),
            colour=_pick(rng, cls.colours),
            texture="plain",
            background="plain",
            clutter=_pick(rng, ("none", "light")),
            style="sketch",
            noise=float(rng.uniform(0, 10)),
        )
    if shift == "atypical":
        return _placed(
            rng,
            label,
            _pick(rng, ("medium", "large")),
            _pick(rng, ("upright", "tilted")),
            colour=_pick(rng, [c for c in COLOURS if c not in cls.colours]),
            texture=_pick(rng, TEXTURES),
            background=_pick(rng, [b for b in BACKGROUNDS if b not in cls.backgrounds]),
            clutter=_pick(rng, ("none", "light")),
        )
    if shift == "occluded":
        return _placed(
            rng,
            label,
            _pick(rng, ("small", "medium")),
            _pick(rng, poses),
            spread=1.0,
            colour=_pick(rng, tuple(COLOURS)),
            texture=_pick(rng, TEXTURES),
            background=_pick(rng, tuple(BACKGROUNDS)),
            clutter="heavy",
            occluders=int(rng.integers(1, 3)),
            noise=float(rng.uniform(5, 20)),
        )
    raise ValueError(f"unknown shift '{shift}' (known: {', '.join(SHIFTS)})")


# ------------------------------------------------------------------------------ texts


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_FRAMES = {
    "photo": (
        "a photo of {}",
        "{}",
        "a picture of {}",
        "photo of {}",
        "close-up of {}",
        "an image of {}",
        "{}, stock photo",
        "{} hd wallpaper",
    ),
    "drawing": ("a drawing of {}", "{} clipart", "{} line art", "art of {}", "{} icon"),
    "sketch": ("a sketch of {}", "a pencil drawing of {}", "{} doodle", "{} sketch"),
}
_POSE_WORDS = {"tilted": "tilted", "upside down": "upside down", "sideways": "lying on its side"}
_TEXTURE_WORDS = {"striped": "striped", "dotted": "dotted", "checkered": "checkered"}
_JUNK = ("untitled", "click to enlarge", "image", "dsc", "img", "new arrivals", "sale")
_SUFFIXES = (" | free shipping", " - stock image", " #art", " (2)", " for sale", " on etsy")


def noun_phrase(scene: Scene, name: str, rng: np.random.Generator) -> str:
    """'a small red striped house': each attribute is said with probability 1/4."""
    words = []
    if scene.size != "medium" and rng.random() < 0.25:
        words.append(scene.size)
    if rng.random() < 0.25:
        words.append(scene.colour)
    if scene.texture in _TEXTURE_WORDS and rng.random() < 0.25:
        words.append(_TEXTURE_WORDS[scene.texture])
    words.append(name)
    return f"{article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A web caption of a corpus scene: usually names the class, sometimes not, or wrongly."""
    cls = CLASSES[scene.label]
    roll = rng.random()
    if roll < 0.04:
        return f"{_pick(rng, _JUNK)} {int(rng.integers(100, 10000))}"
    if roll < 0.1:
        name = "object"  # attributes only: the caption does not name the class
    elif roll < 0.14:
        name = CLASSES[int(rng.integers(len(CLASSES)))].name  # a wrong or lucky name
    else:
        name = cls.name
    text = noun_phrase(scene, name, rng)
    if rng.random() < 0.2:
        text += f" with {_pick(rng, cls.features)}"
    if scene.pose in _POSE_WORDS and rng.random() < 0.3:
        text += f", {_POSE_WORDS[scene.pose]}"
    if scene.style == "photo" and rng.random() < 0.3:
        text += f" {BACKGROUNDS[scene.background]}"
    if scene.clutter == "heavy" and rng.random() < 0.3:
        text += " among clutter"
    text = _pick(rng, _FRAMES[scene.style]).format(text)
    if rng.random() < 0.1:
        text += _pick(rng, _SUFFIXES)
    return text


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def class_descriptions(cls: ObjectClass) -> list[str]:
    """CuPL-style sentences about a class, from its table: parts, shape, colour, context."""
    a = f"{article(cls.name).capitalize()} {cls.name}"
    out = [f"{a} has {f}." for f in cls.features]
    out.append(f"{a} has {' and '.join(cls.features)}.")
    out.append(f"{a} is {cls.shape}.")
    out.append(f"The shape of {article(cls.name)} {cls.name} is {cls.shape}.")
    out.append(f"{a} is usually {_or(list(cls.colours))}.")
    out.append(f"{a} is often seen {_or([BACKGROUNDS[b] for b in cls.backgrounds])}.")
    if cls.texture != "plain":
        out.append(f"{a} is often {cls.texture}.")
    first = re.sub(r"^(a|an) ", "", cls.features[0])
    out.append(f"You can recognise {article(cls.name)} {cls.name} by its {first}.")
    out.append(f"{a} is a common object.")
    return out


def descriptions() -> dict[str, list[str]]:
    """The CuPL JSON of the world: class name -> sentences."""
    return {cls.name: class_descriptions(cls) for cls in CLASSES}
