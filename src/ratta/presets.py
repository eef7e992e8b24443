"""Per-dataset presets of the reference code, kept as data (method.md, "Per-dataset text settings").

Each preset gives the hand templates averaged into the zero-shot (CuPL) classifier W, the
prefix ``pre`` of the description rows, the quantile q, the kind of label set (which picks
the question prompts of ``ratta describe``), and the stem of the published CuPL file.
"""

from __future__ import annotations

from dataclasses import dataclass

# CLIP's 80 ImageNet prompt templates.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 templates CLIP selected for ImageNet ensembling; used for Caltech and SUN397.
CLIP_SEVEN_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def _type_of(noun: str) -> tuple[str, ...]:
    return (f"a photo of a {{}}, a type of {noun}.", f"a photo of the {{}}, a type of {noun}.")


@dataclass(frozen=True)
class DatasetPreset:
    """Text settings and defaults of one dataset.

    Attributes:
        name: ratta's dataset name.
        templates: hand templates for W (``str.format`` with the class name).
        pre: description prefix; row text is ``pre.format(name) + description``, and the bare
            row is ``pre.format(name)`` without its trailing space.
        quantile: q of RA-TTA for this dataset.
        kind: objects, textures, scenes, actions, satellite or fine-grained.
        cupl_stem: ``descriptions/CuPL_prompts_<cupl_stem>.json`` in the reference repository.
        database: the dataset whose database it shares (ImageNet variants share ImageNet's).
    """

    name: str
    templates: tuple[str, ...]
    pre: str
    quantile: float = 0.75
    kind: str = "objects"
    cupl_stem: str = ""
    database: str = ""

    def __post_init__(self) -> None:
        if not self.cupl_stem:
            object.__setattr__(self, "cupl_stem", self.name)
        if not self.database:
            object.__setattr__(self, "database", self.name)


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset("caltech101", CLIP_SEVEN_TEMPLATES, "a photo of a {}. "),
        DatasetPreset("caltech256", CLIP_SEVEN_TEMPLATES, "a photo of a {}. "),
        DatasetPreset("sun397", CLIP_SEVEN_TEMPLATES, "a photo of a {}. ", kind="scenes"),
        DatasetPreset(
            "dtd",
            _type_of("texture"),
            "a photo of a {}, which is a type of texture, or a type of pattern. ",
            kind="textures",
        ),
        DatasetPreset(
            "fgvc_aircraft",
            _type_of("aircraft"),
            "a photo of a {} from Fine-Grained Visual Classification of Aircraft. ",
            kind="fine-grained",
        ),
        DatasetPreset(
            "food101", _type_of("food"), "a photo of a {}, a type of food. ", kind="fine-grained"
        ),
        DatasetPreset(
            "flowers102",
            _type_of("flower"),
            "a photo of a {}, a type of flower. ",
            kind="fine-grained",
        ),
        DatasetPreset(
            "oxford_pets", _type_of("pet"), "a photo of a {}, a type of pet. ", kind="fine-grained"
        ),
        DatasetPreset("stanford_cars", _type_of("car"), "a photo of a {}. ", kind="fine-grained"),
        DatasetPreset(
            "cub200", _type_of("bird"), "a photo of a {}, a type of bird. ", kind="fine-grained"
        ),
        DatasetPreset(
            "resisc45",
            ("a satellite photo of {}.",),
            "a satellite photo of the {}. ",
            kind="satellite",
        ),
        DatasetPreset(
            "ucf101",
            ("a photo of a person doing {}.",),
            "a photo of a person doing {}. ",
            kind="actions",
        ),
        DatasetPreset(
            "imagenet",
            IMAGENET_TEMPLATES,
            "a photo of the {}. ",
            quantile=0.9,
            cupl_stem="imagenet_1k",
        ),
        DatasetPreset(
            "imagenet_v2",
            IMAGENET_TEMPLATES,
            "a photo of the {}. ",
            quantile=0.9,
            database="imagenet",
        ),
        DatasetPreset(
            "imagenet_sketch",
            IMAGENET_TEMPLATES,
            "a sketch photo of a {}. ",
            quantile=0.9,
            database="imagenet",
        ),
        DatasetPreset(
            "imagenet_adversarial", IMAGENET_TEMPLATES, "a photo of the {}. ", quantile=0.9
        ),
        DatasetPreset(
            "imagenet_rendition", IMAGENET_TEMPLATES, "a rendition photo of the {}. ", quantile=0.9
        ),
    )
}


def get_preset(name: str) -> DatasetPreset:
    """The preset of ``name`` (one of :data:`PRESETS`)."""
    from ratta.errors import RattaInputError

    if name not in PRESETS:
        raise RattaInputError(f"unknown dataset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]
