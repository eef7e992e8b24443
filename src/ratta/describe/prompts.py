"""The question prompts and hand templates of ``ratta describe``, as data.

Every prompt and template has one ``{}``, filled with the class name.
"""

from __future__ import annotations

from ratta.errors import RattaInputError

KINDS = ("objects", "textures", "scenes", "actions", "satellite", "fine-grained")

# Question prompts per kind of label set; ``{}`` is the class name.
QUESTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "objects": (
        "What does a {} look like?",
        "How would you recognise a {} in a photo?",
        "Which visual features set a {} apart from other things?",
        "Describe the shape, colours and parts of a {}.",
        "Describe what you see in a typical photo of a {}.",
    ),
    "textures": (
        "What does a {} texture look like?",
        "How would you recognise a {} surface pattern in a photo?",
        "Describe the lines, colours and repetitions of a {} pattern.",
        "Which visual features make a texture look {}?",
        "Describe a close-up photo of a surface with a {} texture.",
    ),
    "scenes": (
        "What does a {} look like?",
        "Which objects and surroundings would a photo of a {} show?",
        "How can you tell that a photo was taken in a {}?",
        "Describe the layout, lighting and colours of a typical {}.",
        "Describe what you see in a photo of a {}.",
    ),
    "actions": (
        "What does a person doing {} look like?",
        "How would you recognise someone doing {} in a video frame?",
        "Describe the body posture and movements of a person doing {}.",
        "Which objects and places are usually seen when someone is doing {}?",
        "Describe a photo of a person doing {}.",
    ),
    "satellite": (
        "What does {} look like in a satellite image?",
        "How would you identify {} in an aerial photo?",
        "Describe the shapes, colours and layout of {} seen from above.",
        "What usually surrounds {} in a satellite image?",
        "Describe an aerial photo of {}.",
    ),
    "fine-grained": (
        "What does a {} look like?",
        "How can you tell a {} apart from similar ones?",
        "Which distinctive visual features does a {} have?",
        "Describe the colours, markings and shape of a {}.",
        "Describe what you see in a close-up photo of a {}.",
    ),
}

# Hand templates of --templates-only when no dataset preset supplies its own.
GENERIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "objects": ("a photo of a {}.", "a close-up photo of a {}.", "a picture showing a {}."),
    "textures": (
        "a photo of a {} texture.",
        "a close-up photo of a {} pattern.",
        "a surface with a {} texture.",
    ),
    "scenes": ("a photo of a {}.", "a photo taken in a {}.", "a wide view of a {}."),
    "actions": (
        "a photo of a person doing {}.",
        "a video frame of someone doing {}.",
        "a person doing {}.",
    ),
    "satellite": ("a satellite photo of {}.", "an aerial view of {}.", "{} seen from above."),
    "fine-grained": (
        "a photo of a {}.",
        "a close-up photo of a {}.",
        "a detailed photo of a {}.",
    ),
}

# Chat models otherwise open with a preamble or a list; CLIP wants short visual sentences.
SYSTEM_PROMPT = (
    "You describe how things look. Answer in one or two short sentences about visual "
    "appearance, without a preamble and without a list."
)

TEMPLATES_ONLY_NOTE = (
    "descriptions are hand templates filled with the class names, not LLM answers; "
    "expect lower accuracy than with LLM descriptions"
)


def check_template(template: str, what: str) -> None:
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "\0" not in filled:
        raise RattaInputError(f"{what} {template!r} must contain '{{}}' for the class name")


# The endpoint asked by default, and where its key is read from (first set wins).
DEFAULT_LLM_URL = "https://api.openai.com/v1"
KEY_ENV = ("RATTA_LLM_API_KEY", "OPENAI_API_KEY")
