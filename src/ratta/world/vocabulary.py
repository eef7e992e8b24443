"""The world's vocabulary as data: attribute tables and 45 object classes built from parts.

A class is a list of drawn parts in a unit frame (x right, y down, the object inside
[-1, 1]^2) plus what is typically true of it: its colours, backgrounds and texture, and the
phrases that name its parts and shape. The parts make class identity visible in the
pixels; the typical attributes are what web captions and class descriptions say about it,
true of the corpus and broken on purpose by the shifted test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Point = tuple[float, float]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 210, 40),
    "green": (50, 160, 60),
    "blue": (40, 90, 210),
    "purple": (130, 60, 170),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (35, 35, 35),
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
}

# Fixed colours of the secondary parts (a tree's trunk is brown whatever its crown).
PART_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "dark": (30, 30, 30),
    "beige": (230, 200, 150),
    "silver": (190, 195, 200),
    "gold": (220, 180, 50),
}

TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "medium", "large")
POSES = ("upright", "tilted", "upside down", "sideways")
CLUTTER = ("none", "light", "heavy")

# background -> the phrase a caption or description uses for it
BACKGROUNDS: dict[str, str] = {
    "plain": "on a plain background",
    "sky": "in the sky",
    "grass": "on the grass",
    "sand": "on the sand",
    "water": "in the water",
    "night": "at night",
    "brick": "against a brick wall",
    "wood": "on a wooden table",
    "snow": "in the snow",
}


@dataclass(frozen=True)
class Part:
    """A polygon (``width`` 0: filled) or a polyline of ``width`` in unit-frame units.

    ``role`` is ``main`` (the object's colour and texture) or a key of
    :data:`PART_COLOURS`.
    """

    points: tuple[Point, ...]
    role: str = "main"
    width: float = 0.0


@dataclass(frozen=True)
class ObjectClass:
    """One class: its drawing and what is typically true of it.

    Attributes:
        name: the class name (words separated by spaces).
        parts: drawn in order, later parts over earlier ones.
        colours: typical colours of the main parts (keys of :data:`COLOURS`).
        backgrounds: typical backgrounds (keys of :data:`BACKGROUNDS`).
        texture: the typical texture of the main parts.
        features: phrases naming visible parts, each completing "a {name} has ...".
        shape: a phrase completing "a {name} is ...", about its outline.
        upright: drawn upright in the corpus (a tree does not lie on its side on the web).
    """

    name: str
    parts: tuple[Part, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    texture: str
    features: tuple[str, ...]
    shape: str
    upright: bool = True

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")


# ------------------------------------------------------------------------ geometry helpers


def ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0, a1: float = 360) -> tuple:
    """Points of an ellipse (or of the arc from ``a0`` to ``a1`` degrees, closed by a chord)."""
    n = max(6, round(24 * abs(a1 - a0) / 360))
    return tuple(
        (
            cx + rx * math.cos(math.radians(a0 + (a1 - a0) * i / n)),
            cy + ry * math.sin(math.radians(a0 + (a1 - a0) * i / n)),
        )
        for i in range(n + (a1 - a0 < 360))
    )


def circle(cx: float, cy: float, r: float) -> tuple:
    return ellipse(cx, cy, r, r)


def rect(x0: float, y0: float, x1: float, y1: float) -> tuple:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def star_points(cx: float, cy: float, r: float, inner: float, n: int = 5) -> tuple:
    return tuple(
        (
            cx + (r if i % 2 == 0 else inner) * math.sin(math.pi * i / n),
            cy - (r if i % 2 == 0 else inner) * math.cos(math.pi * i / n),
        )
        for i in range(2 * n)
    )


def fill(points: tuple, role: str = "main") -> Part:
    return Part(points, role)


def line(points: tuple, width: float, role: str = "dark") -> Part:
    return Part(points, role, width)


def ring(cx: float, cy: float, r: float, width: float, role: str = "main") -> Part:
    pts = circle(cx, cy, r)
    return Part((*pts, pts[0]), role, width)


def _heart() -> tuple:
    pts = []
    for i in range(32):
        t = 2 * math.pi * i / 32
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17 - 0.1))
    return tuple(pts)


def _crescent() -> tuple:
    outer = ellipse(0, 0, 0.85, 0.85, 60, 300)
    inner = ellipse(0.35, 0, 0.62, 0.62, 290, 70)
    return outer + inner


def _bell() -> tuple:
    left = ((-0.15, -0.7), (-0.45, -0.5), (-0.55, 0.1), (-0.8, 0.55))
    return (*left, *((-x, y) for x, y in reversed(left)))


# ------------------------------------------------------------------------------ classes


def _cls(
    name: str,
    parts: list[Part],
    colours: str,
    backgrounds: str,
    features: str,
    shape: str,
    texture: str = "plain",
    upright: bool = True,
) -> ObjectClass:
    return ObjectClass(
        name,
        tuple(parts),
        tuple(colours.split()),
        tuple(backgrounds.split()),
        texture,
        tuple(features.split("; ")),
        shape,
        upright,
    )


_TABLE: tuple[ObjectClass, ...] = (
    _cls(
        "house",
        [
            fill(rect(-0.7, -0.1, 0.7, 0.9)),
            fill(((-0.9, -0.05), (0, -0.85), (0.9, -0.05)), "dark"),
            fill(rect(-0.15, 0.35, 0.15, 0.9), "brown"),
            fill(rect(0.3, 0.15, 0.55, 0.4), "white"),
        ],
        "red white yellow brown",
        "grass sky",
        "a triangular roof; a door; a square window",
        "a square with a triangle on top",
    ),
    _cls(
        "tree",
        [fill(rect(-0.12, 0.2, 0.12, 0.95), "brown"), fill(circle(0, -0.3, 0.62))],
        "green",
        "grass sky",
        "a brown trunk; a round crown of leaves",
        "a circle on a stick",
    ),
    _cls(
        "pine",
        [
            fill(rect(-0.1, 0.6, 0.1, 0.95), "brown"),
            fill(((-0.75, 0.65), (0, -0.05), (0.75, 0.65))),
            fill(((-0.6, 0.25), (0, -0.5), (0.6, 0.25))),
            fill(((-0.42, -0.15), (0, -0.92), (0.42, -0.15))),
        ],
        "green",
        "snow grass",
        "a brown trunk; three stacked triangles of needles; a pointed top",
        "tall and triangular",
    ),
    _cls(
        "snowman",
        [
            fill(circle(0, 0.5, 0.45)),
            fill(circle(0, -0.1, 0.33)),
            fill(circle(0, -0.6, 0.25)),
            fill(((0, -0.62), (0.3, -0.56), (0, -0.52)), "orange"),
            fill(circle(-0.09, -0.7, 0.04), "dark"),
            fill(circle(0.09, -0.7, 0.04), "dark"),
        ],
        "white",
        "snow night",
        "three stacked balls; a carrot nose; two black eyes",
        "three circles on top of each other",
    ),
    _cls(
        "umbrella",
        [
            fill(ellipse(0, -0.1, 0.9, 0.7, 180, 360)),
            line(((0, -0.1), (0, 0.7), (-0.05, 0.82), (-0.2, 0.82), (-0.25, 0.7)), 0.08),
        ],
        "red blue black yellow",
        "sky snow",
        "a dome-shaped canopy; a curved handle",
        "a half circle on a hooked stick",
        texture="striped",
    ),
    _cls(
        "mushroom",
        [
            fill(rect(-0.2, -0.05, 0.2, 0.8), "beige"),
            fill(ellipse(0, 0.05, 0.8, 0.75, 180, 360)),
        ],
        "red brown",
        "grass",
        "a dome-shaped cap; a short white stem",
        "a half circle on a short stem",
        texture="dotted",
    ),
    _cls(
        "lollipop",
        [line(((0, 0.1), (0, 0.95)), 0.1, "white"), fill(circle(0, -0.35, 0.5))],
        "pink red purple",
        "plain",
        "a round candy; a white stick",
        "a circle on a straight stick",
        texture="striped",
    ),
    _cls(
        "balloon",
        [
            line(((0, 0.35), (0.08, 0.55), (-0.06, 0.75), (0.04, 0.95)), 0.03),
            fill(((0, 0.3), (-0.08, 0.4), (0.08, 0.4))),
            fill(ellipse(0, -0.3, 0.5, 0.62)),
        ],
        "red blue yellow pink",
        "sky",
        "an oval body; a thin string",
        "an oval on a thin string",
    ),
    _cls(
        "key",
        [
            ring(0, -0.55, 0.3, 0.14),
            fill(rect(-0.06, -0.25, 0.06, 0.9)),
            fill(rect(0.06, 0.55, 0.3, 0.65)),
            fill(rect(0.06, 0.78, 0.25, 0.88)),
        ],
        "yellow gray",
        "wood plain",
        "a ring at the top; a long shaft; teeth at the end",
        "a ring on a long thin bar",
    ),
    _cls(
        "arrow",
        [
            line(((-0.75, 0.75), (0.5, -0.5)), 0.09, "brown"),
            fill(((0.75, -0.75), (0.3, -0.6), (0.6, -0.3))),
            fill(((-0.75, 0.75), (-0.85, 0.45), (-0.65, 0.55), (-0.55, 0.65), (-0.45, 0.85))),
        ],
        "red black",
        "plain wood",
        "a triangular head; a long shaft; feathers at the back",
        "long, thin and pointed",
    ),
    _cls(
        "star",
        [fill(star_points(0, 0.05, 0.95, 0.4))],
        "yellow",
        "night",
        "five points",
        "a shape with five points",
    ),
    _cls(
        "heart",
        [fill(_heart())],
        "red pink",
        "plain",
        "two round lobes; a pointed bottom",
        "two round bumps on top of a point",
    ),
    _cls(
        "moon",
        [fill(_crescent())],
        "yellow white",
        "night",
        "a thin curved edge",
        "a crescent",
    ),
    _cls(
        "sun",
        [
            *(
                line(
                    (
                        (0.5 * math.cos(a), 0.5 * math.sin(a)),
                        (0.92 * math.cos(a), 0.92 * math.sin(a)),
                    ),
                    0.09,
                    "orange",
                )
                for a in (math.pi * k / 4 for k in range(8))
            ),
            fill(circle(0, 0, 0.48)),
        ],
        "yellow orange",
        "sky",
        "a round disc; rays around it",
        "a circle with rays",
    ),
    _cls(
        "flower",
        [
            line(((0, 0.2), (0, 0.95)), 0.08, "green"),
            *(
                fill(circle(0.32 * math.cos(a), -0.3 + 0.32 * math.sin(a), 0.24))
                for a in (2 * math.pi * k / 6 for k in range(6))
            ),
            fill(circle(0, -0.3, 0.17), "yellow"),
        ],
        "red pink purple white",
        "grass",
        "round petals; a yellow centre; a green stem",
        "a ring of petals on a stem",
    ),
    _cls(
        "fish",
        [
            fill(((0.45, 0), (0.9, -0.4), (0.9, 0.4))),
            fill(ellipse(-0.1, 0, 0.6, 0.35)),
            fill(circle(-0.42, -0.08, 0.06), "dark"),
        ],
        "orange blue yellow",
        "water",
        "an oval body; a triangular tail; a round eye",
        "an oval with a triangle at one end",
        upright=False,
    ),
    _cls(
        "car",
        [
            fill(rect(-0.9, 0.0, 0.9, 0.45)),
            fill(((-0.5, 0.0), (-0.3, -0.4), (0.35, -0.4), (0.55, 0.0))),
            fill(rect(-0.25, -0.32, 0.05, -0.02), "white"),
            fill(circle(-0.5, 0.5, 0.22), "dark"),
            fill(circle(0.5, 0.5, 0.22), "dark"),
        ],
        "red blue black white gray",
        "brick plain",
        "two round wheels; a cabin with windows",
        "low and long",
    ),
    _cls(
        "bus",
        [
            fill(rect(-0.95, -0.5, 0.95, 0.45)),
            *(fill(rect(x, -0.38, x + 0.3, -0.08), "white") for x in (-0.8, -0.4, 0.0, 0.4)),
            fill(circle(-0.55, 0.5, 0.2), "dark"),
            fill(circle(0.55, 0.5, 0.2), "dark"),
        ],
        "yellow red",
        "brick plain",
        "two round wheels; a row of windows",
        "a long box",
    ),
    _cls(
        "boat",
        [
            line(((0, 0.3), (0, -0.9)), 0.06, "brown"),
            fill(((0.05, -0.85), (0.7, 0.2), (0.05, 0.2)), "white"),
            fill(((-0.9, 0.35), (0.9, 0.35), (0.6, 0.75), (-0.6, 0.75))),
        ],
        "white brown red",
        "water",
        "a hull; a triangular sail; a mast",
        "a triangle above a trapezoid",
    ),
    _cls(
        "rocket",
        [
            fill(((-0.25, 0.7), (-0.5, 0.95), (-0.25, 0.3)), "red"),
            fill(((0.25, 0.7), (0.5, 0.95), (0.25, 0.3)), "red"),
            fill(((-0.25, 0.75), (-0.25, -0.4), (0, -0.95), (0.25, -0.4), (0.25, 0.75))),
            fill(circle(0, -0.2, 0.12), "blue"),
            fill(((-0.15, 0.78), (0, 1.0), (0.15, 0.78)), "orange"),
        ],
        "white gray",
        "night sky",
        "a pointed nose; fins at the bottom; a round window",
        "tall, thin and pointed",
    ),
    _cls(
        "mug",
        [ring(0.55, 0.05, 0.25, 0.12), fill(rect(-0.6, -0.5, 0.45, 0.7))],
        "white blue red",
        "wood",
        "a cylindrical body; a handle on the side",
        "a box with a loop on one side",
    ),
    _cls(
        "bottle",
        [
            fill(rect(-0.35, -0.2, 0.35, 0.95)),
            fill(((-0.35, -0.2), (-0.12, -0.5), (0.12, -0.5), (0.35, -0.2))),
            fill(rect(-0.12, -0.8, 0.12, -0.45)),
            fill(rect(-0.14, -0.92, 0.14, -0.78), "dark"),
        ],
        "green brown blue",
        "wood plain",
        "a narrow neck; a cap; a tall body",
        "tall with a narrow top",
    ),
    _cls(
        "lamp",
        [
            line(((0, -0.2), (0, 0.8)), 0.07, "dark"),
            fill(rect(-0.4, 0.78, 0.4, 0.92), "dark"),
            fill(((-0.55, 0.0), (-0.3, -0.7), (0.3, -0.7), (0.55, 0.0))),
        ],
        "yellow white green",
        "brick wood",
        "a lampshade; a thin pole; a flat base",
        "a trapezoid on a pole",
    ),
    _cls(
        "table",
        [
            fill(rect(-0.95, -0.25, 0.95, -0.05)),
            fill(rect(-0.8, -0.05, -0.65, 0.8)),
            fill(rect(0.65, -0.05, 0.8, 0.8)),
        ],
        "brown",
        "brick plain",
        "a flat top; four legs",
        "a flat board on legs",
        texture="striped",
    ),
    _cls(
        "chair",
        [
            fill(rect(-0.5, -0.9, -0.35, 0.9)),
            fill(rect(-0.5, 0.05, 0.5, 0.2)),
            fill(rect(0.35, 0.2, 0.5, 0.9)),
            fill(rect(-0.5, -0.9, 0.1, -0.75)),
        ],
        "brown red black",
        "brick wood",
        "a seat; a high back; four legs",
        "an L shape on legs",
    ),
    _cls(
        "ladder",
        [
            fill(rect(-0.5, -0.95, -0.38, 0.95)),
            fill(rect(0.38, -0.95, 0.5, 0.95)),
            *(fill(rect(-0.4, y, 0.4, y + 0.1)) for y in (-0.7, -0.35, 0.0, 0.35, 0.7)),
        ],
        "brown gray",
        "brick sky",
        "two long rails; evenly spaced rungs",
        "tall with many steps",
    ),
    _cls(
        "fork",
        [
            fill(rect(-0.08, -0.05, 0.08, 0.95)),
            fill(rect(-0.3, -0.2, 0.3, -0.02)),
            *(fill(rect(x, -0.85, x + 0.08, -0.15)) for x in (-0.3, -0.11, 0.08, 0.22)),
        ],
        "gray",
        "wood plain",
        "a long handle; prongs at the end",
        "long and thin with prongs",
    ),
    _cls(
        "spoon",
        [fill(rect(-0.07, -0.1, 0.07, 0.95)), fill(ellipse(0, -0.5, 0.3, 0.42))],
        "gray",
        "wood plain",
        "a long handle; an oval bowl",
        "long and thin with an oval end",
    ),
    _cls(
        "bell",
        [
            ring(0, -0.8, 0.12, 0.06, "dark"),
            fill(_bell()),
            fill(circle(0, 0.68, 0.13), "dark"),
        ],
        "yellow",
        "sky brick",
        "a flared rim; a clapper; a loop on top",
        "a flared dome",
    ),
    _cls(
        "kite",
        [
            line(((0, 0.85), (0.15, 0.95), (0.35, 0.9), (0.55, 0.98)), 0.04),
            fill(((0, -0.9), (0.5, -0.2), (0, 0.85), (-0.5, -0.2))),
            line(((0, -0.9), (0, 0.85)), 0.03),
            line(((-0.5, -0.2), (0.5, -0.2)), 0.03),
        ],
        "red blue yellow green",
        "sky",
        "a diamond-shaped sail; a cross of sticks; a long tail",
        "a diamond",
    ),
    _cls(
        "clock",
        [
            fill(circle(0, 0, 0.9)),
            fill(circle(0, 0, 0.72), "white"),
            *(
                fill(circle(0.6 * math.cos(a), 0.6 * math.sin(a), 0.05), "dark")
                for a in (math.pi * k / 6 for k in range(12))
            ),
            line(((0, 0), (0, -0.5)), 0.06),
            line(((0, 0), (0.35, 0.1)), 0.06),
        ],
        "black white red",
        "brick plain",
        "a round face; two hands; marks around the edge",
        "a circle with two hands",
    ),
    _cls(
        "donut",
        [ring(0, 0, 0.55, 0.5)],
        "pink brown",
        "plain wood",
        "a hole in the middle; a round body",
        "a ring",
        texture="dotted",
    ),
    _cls(
        "pencil",
        [
            fill(rect(-0.14, -0.55, 0.14, 0.6)),
            fill(((-0.14, 0.6), (0.14, 0.6), (0, 0.95)), "beige"),
            fill(((-0.05, 0.82), (0.05, 0.82), (0, 0.95)), "dark"),
            fill(rect(-0.14, -0.9, 0.14, -0.62), "pink"),
            fill(rect(-0.14, -0.62, 0.14, -0.55), "silver"),
        ],
        "yellow",
        "wood plain",
        "a sharpened tip; an eraser; a long hexagonal body",
        "long, thin and pointed",
        upright=False,
    ),
    _cls(
        "envelope",
        [
            fill(rect(-0.9, -0.55, 0.9, 0.55)),
            line(((-0.9, -0.55), (0, 0.1), (0.9, -0.55)), 0.05),
        ],
        "white yellow",
        "wood plain",
        "a folded flap; a rectangular body",
        "a rectangle with a V on it",
    ),
    _cls(
        "tent",
        [
            fill(((-0.95, 0.8), (0, -0.8), (0.95, 0.8))),
            fill(((-0.3, 0.8), (0, 0.1), (0.3, 0.8)), "dark"),
        ],
        "orange green blue",
        "grass night",
        "a triangular door; sloping sides",
        "a large triangle",
    ),
    _cls(
        "candle",
        [
            fill(rect(-0.25, -0.3, 0.25, 0.95)),
            line(((0, -0.3), (0, -0.45)), 0.04),
            fill(ellipse(0, -0.65, 0.14, 0.25), "orange"),
            fill(ellipse(0, -0.6, 0.07, 0.14), "yellow"),
        ],
        "white red purple",
        "night wood",
        "a flame on top; a wick; a wax body",
        "a tall block with a flame",
    ),
    _cls(
        "axe",
        [
            fill(rect(-0.07, -0.8, 0.07, 0.95), "brown"),
            fill(((0.05, -0.75), (0.6, -0.95), (0.6, -0.15), (0.05, -0.35))),
        ],
        "gray red",
        "wood grass",
        "a long wooden handle; a wide blade on one side",
        "a long stick with a blade",
    ),
    _cls(
        "hammer",
        [
            fill(rect(-0.07, -0.55, 0.07, 0.95), "brown"),
            fill(rect(-0.5, -0.85, 0.5, -0.5)),
        ],
        "gray black",
        "wood",
        "a long wooden handle; a heavy head across the top",
        "a T shape",
    ),
    _cls(
        "glasses",
        [
            ring(-0.45, 0, 0.3, 0.08),
            ring(0.45, 0, 0.3, 0.08),
            line(((-0.15, -0.05), (0, -0.12), (0.15, -0.05)), 0.07, "main"),
            line(((-0.75, 0), (-0.95, -0.15)), 0.06, "main"),
            line(((0.75, 0), (0.95, -0.15)), 0.06, "main"),
        ],
        "black brown red",
        "plain wood",
        "two round lenses; a bridge between them",
        "two circles side by side",
    ),
    _cls(
        "dumbbell",
        [
            fill(rect(-0.7, -0.06, 0.7, 0.06), "silver"),
            fill(rect(-0.8, -0.45, -0.5, 0.45)),
            fill(rect(0.5, -0.45, 0.8, 0.45)),
        ],
        "black gray",
        "plain wood",
        "a short bar; heavy weights at both ends",
        "two blocks joined by a bar",
    ),
    _cls(
        "hourglass",
        [
            fill(rect(-0.6, -0.95, 0.6, -0.8), "brown"),
            fill(rect(-0.6, 0.8, 0.6, 0.95), "brown"),
            fill(((-0.45, -0.8), (0.45, -0.8), (0.05, 0), (0.45, 0.8), (-0.45, 0.8), (-0.05, 0))),
        ],
        "yellow white",
        "sand wood",
        "two glass bulbs; a narrow waist; flat ends",
        "two triangles tip to tip",
    ),
    _cls(
        "crown",
        [
            fill(
                (
                    (-0.8, 0.5),
                    (-0.8, -0.5),
                    (-0.4, 0.0),
                    (0, -0.6),
                    (0.4, 0.0),
                    (0.8, -0.5),
                    (0.8, 0.5),
                )
            ),
            fill(circle(0, 0.25, 0.1), "red"),
        ],
        "yellow",
        "plain",
        "pointed spikes; a jewel",
        "a zigzag band",
    ),
    _cls(
        "cactus",
        [
            fill(rect(-0.2, -0.8, 0.2, 0.95)),
            fill(rect(-0.6, -0.1, -0.2, 0.1)),
            fill(rect(-0.6, -0.5, -0.4, 0.1)),
            fill(rect(0.2, 0.2, 0.6, 0.4)),
            fill(rect(0.4, -0.3, 0.6, 0.4)),
        ],
        "green",
        "sand",
        "a tall stem; two arms pointing up",
        "a tall column with arms",
    ),
    _cls(
        "anchor",
        [
            ring(0, -0.75, 0.15, 0.07),
            fill(rect(-0.07, -0.6, 0.07, 0.75)),
            fill(rect(-0.4, -0.45, 0.4, -0.33)),
            line(ellipse(0, 0.15, 0.7, 0.65, 20, 160), 0.12, "main"),
        ],
        "black gray",
        "water sand",
        "a ring at the top; curved arms at the bottom; a crossbar",
        "a vertical bar with a curve at the bottom",
    ),
    _cls(
        "ice cream",
        [
            fill(((-0.4, -0.1), (0.4, -0.1), (0, 0.95)), "beige"),
            fill(circle(0, -0.4, 0.45)),
        ],
        "pink white brown",
        "plain sand",
        "a cone; a round scoop on top",
        "a ball on a cone",
    ),
)

# Label order is the order of the class folders' names, as `--dataset folder` reads them.
CLASSES: tuple[ObjectClass, ...] = tuple(sorted(_TABLE, key=lambda c: c.folder))
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
