"""The text prompts of each peer's paper classifier, per dataset, as data with their source.

A classifier row is, as in every official code, normalise(mean_t normalise(g(t))) over the
class's prompts t (``ratta.text`` encodes them). ZERO and MTA use CLIP's single template;
TDA and BoostAdapter a per-dataset template list (``datasets/<name>.py`` of kdiAAA/TDA
@e697fb0; BoostAdapter's copies are identical); DMN-ZS its "tip" templates plus every CuPL
sentence of the class (``data/imagnet_prompts.py`` and ``clip/fix_clip.py`` of YBZh/DMN
@c6c218c, with the davinci-era CuPL files of ``data/gpt3_prompts/``). Datasets without
published prompts (Caltech256, CUB200, RESISC45) get ImageNet's, as their other settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from ratta.errors import RattaInputError
from ratta.peers.defaults import CACHE_SETTINGS, FALLBACK
from ratta.presets import CLIP_SEVEN_TEMPLATES, IMAGENET_TEMPLATES, get_preset

# ZERO: "{ctx_init} {name}." with ctx_init a_photo_of_a; MTA: CoOp's prompt from the same init.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)


def _type_of(noun: str, article: str = "a ") -> tuple[str, ...]:
    return (f"a photo of {article}{{}}, a type of {noun}.",)


TDA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caltech101": CLIP_SEVEN_TEMPLATES,
    "dtd": ("{} texture.",),
    "fgvc_aircraft": _type_of("aircraft"),
    "food101": _type_of("food", article=""),
    "flowers102": _type_of("flower"),
    "oxford_pets": _type_of("pet"),
    "stanford_cars": CLIP_SEVEN_TEMPLATES,
    "sun397": CLIP_SEVEN_TEMPLATES,
    "ucf101": ("a photo of a person doing {}.",),
    "imagenet": CLIP_SEVEN_TEMPLATES,
    "imagenet_adversarial": CLIP_SEVEN_TEMPLATES,
    "imagenet_v2": CLIP_SEVEN_TEMPLATES,
    "imagenet_rendition": IMAGENET_TEMPLATES,
    "imagenet_sketch": IMAGENET_TEMPLATES,
}

# DMN's ID_to_prompts: TDA's but for cars; its ImageNet family (one-letter set ids) all use
# the tip templates.
DMN_TEMPLATES: dict[str, tuple[str, ...]] = {
    **TDA_TEMPLATES,
    "stanford_cars": _type_of("car"),
    "imagenet_rendition": CLIP_SEVEN_TEMPLATES,
    "imagenet_sketch": CLIP_SEVEN_TEMPLATES,
}

# The CuPL file DMN reads per dataset (ID_to_gptprompts_path; the ImageNet family's).
DMN_CUPL_FILES: dict[str, str] = {
    "caltech101": "CuPL_prompts_caltech101.json",
    "dtd": "CuPL_prompts_dtd.json",
    "fgvc_aircraft": "CuPL_prompts_fgvcaircraft.json",
    "food101": "CuPL_prompts_food101.json",
    "flowers102": "CuPL_prompts_flowers102.json",
    "oxford_pets": "CuPL_prompts_oxfordpets.json",
    "stanford_cars": "CuPL_prompts_stanfordcars.json",
    "sun397": "CuPL_prompts_sun397.json",
    "ucf101": "CuPL_prompts_ucf101.json",
    **{
        name: "CuPL_prompts_imagenet.json"
        for name in (
            "imagenet",
            "imagenet_adversarial",
            "imagenet_v2",
            "imagenet_rendition",
            "imagenet_sketch",
        )
    },
}


# The text file key (``baseline_<key>``) of each peer's paper classifier: ZERO and MTA share
# CLIP's single template, BoostAdapter TDA's templates.
PAPER_CLASSIFIERS: dict[str, str] = {
    "zero": "peer_single",
    "mta": "peer_single",
    "tda": "peer_tda",
    "boost": "peer_tda",
    "dmn": "peer_dmn",
}


def _templates(method: str, dataset: str) -> tuple[str, ...]:
    key = dataset if dataset in CACHE_SETTINGS else FALLBACK
    by_method = {
        "zero": SINGLE_TEMPLATE,
        "mta": SINGLE_TEMPLATE,
        "tda": TDA_TEMPLATES[key],
        "boost": TDA_TEMPLATES[key],
        "dmn": DMN_TEMPLATES[key],
    }
    if method not in by_method:
        raise RattaInputError(f"unknown peer '{method}' (known: {', '.join(by_method)})")
    return by_method[method]


def paper_templates(dataset: str) -> dict[str, list[str]]:
    """The templates of every peer's paper classifier on ``dataset``, by text file key (what
    identifies them; DMN-ZS adds the CuPL sentences)."""
    get_preset(dataset)
    return {key: list(_templates(m, dataset)) for m, key in PAPER_CLASSIFIERS.items()}


def peer_prompts(
    method: str,
    dataset: str,
    class_names: Sequence[str],
    sentences: Sequence[Sequence[str] | None] | None = None,
) -> list[list[str]]:
    """Per class (in label order), the prompts of ``method``'s paper classifier on ``dataset``.

    Class names have "_" replaced by spaces, as the official codes do. DMN-ZS appends each
    class's CuPL sentences: ``sentences`` holds them per class, in label order (None or empty
    for a class without any: its templates only).
    """
    get_preset(dataset)
    templates = _templates(method, dataset)
    names = [name.replace("_", " ") for name in class_names]
    prompts = [[t.format(name) for t in templates] for name in names]
    if method == "dmn":
        if sentences is None:
            paper = DMN_CUPL_FILES.get(dataset, DMN_CUPL_FILES[FALLBACK])
            raise RattaInputError(
                f"DMN-ZS's classifier needs CuPL sentences ({paper} in its paper)"
            )
        if len(sentences) != len(names):
            raise RattaInputError(
                f"DMN-ZS's classifier: CuPL sentences for {len(sentences)} classes, "
                f"expected {len(names)}"
            )
        for rows, own in zip(prompts, sentences, strict=True):
            rows.extend(own or ())
    return prompts


def paper_classifier_prompts(
    dataset: str,
    class_names: Sequence[str],
    sentences: Sequence[Sequence[str] | None],
) -> dict[str, list[list[str]]]:
    """The prompts of every peer's paper classifier, by text file key (PAPER_CLASSIFIERS)."""
    methods = {key: method for method, key in PAPER_CLASSIFIERS.items()}  # same prompts
    return {
        key: peer_prompts(method, dataset, class_names, sentences)
        for key, method in sorted(methods.items())
    }
