"""Per-dataset settings of the peers as published in their official code, with the source.

Dataset names are ratta's (``ratta.presets.PRESETS``). Caltech256, CUB200 and RESISC45 have
no published settings: they get ImageNet's, with ``published`` False so reports can flag it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ratta.peers.dmn import DMNConfig
from ratta.peers.mta import MTAConfig
from ratta.peers.tda import BoostConfig, TDAConfig
from ratta.peers.zero import ZeroConfig
from ratta.presets import get_preset


@dataclass(frozen=True)
class Source:
    """A file of a public repository at a commit."""

    repo: str
    commit: str
    path: str

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit}:{self.path}"


TDA = ("kdiAAA/TDA", "e697fb0")
BOOST = ("taolinzhang/BoostAdapter", "9983e1a")
ZERO = ("FarinaMatteo/zero", "c609f7c")
MTA = ("MaxZanella/MTA", "cafafdf")
DMN = ("YBZh/DMN", "c6c218c")
TTA_VLM = ("TomSheng21/tta-vlm", "bcc735f")


@dataclass(frozen=True)
class _Cache:
    """One dataset's row of the TDA/BoostAdapter configs."""

    config: str  # configs/<config>.yaml in both repositories
    alpha: float
    beta: float
    query: str  # what the official loader feeds: one centre crop, or 63 views + the crop
    delta: int | None  # BoostAdapter's delta; None: one view only (ImageNet), no boosting


# alpha/beta of TDA's configs (BoostAdapter's are the same values); the query follows
# build_test_data_loader of utils.py: AugMix views on ImageNet-A/V2/R/Sketch.
CACHE_SETTINGS: dict[str, _Cache] = {
    "caltech101": _Cache("caltech101", 5.0, 5.0, "z0", 2),
    "dtd": _Cache("dtd", 2.0, 3.0, "z0", 0),
    "fgvc_aircraft": _Cache("fgvc", 2.0, 2.0, "z0", 2),
    "food101": _Cache("food101", 1.0, 1.0, "z0", 3),
    "flowers102": _Cache("oxford_flowers", 1.0, 5.0, "z0", 0),
    "oxford_pets": _Cache("oxford_pets", 2.0, 7.0, "z0", 0),
    "stanford_cars": _Cache("stanford_cars", 1.0, 7.0, "z0", 3),
    "sun397": _Cache("sun397", 2.0, 3.0, "z0", 1),
    "ucf101": _Cache("ucf101", 3.0, 8.0, "z0", 0),
    "imagenet": _Cache("imagenet", 2.0, 5.0, "z0", None),
    "imagenet_adversarial": _Cache("imagenet_a", 2.0, 5.0, "views", 3),
    "imagenet_v2": _Cache("imagenet_v", 1.0, 8.0, "views", 1),
    "imagenet_rendition": _Cache("imagenet_r", 1.0, 8.0, "views", 3),
    "imagenet_sketch": _Cache("imagenet_s", 2.363, 7.45, "views", 1),
}
FALLBACK = "imagenet"


@dataclass(frozen=True)
class PeerDefaults:
    """The official settings of every peer on one dataset.

    Attributes:
        dataset: ratta's dataset name.
        published: False when the dataset has no published settings and ImageNet's are used.
        sources: per method, the files the settings come from.
    """

    dataset: str
    published: bool
    zero: ZeroConfig
    mta: MTAConfig
    tda: TDAConfig
    boost: BoostConfig
    dmn: DMNConfig
    sources: dict[str, tuple[Source, ...]]


def peer_defaults(dataset: str) -> PeerDefaults:
    """The peers' official settings for ``dataset`` (ImageNet's where none are published)."""
    get_preset(dataset)  # one error line for an unknown name
    published = dataset in CACHE_SETTINGS
    row = CACHE_SETTINGS[dataset if published else FALLBACK]
    tda = TDAConfig(alpha=row.alpha, beta=row.beta, query=row.query)  # type: ignore[arg-type]
    boost_cache = replace(tda, fifo_negative=True, inputs=1 if row.delta is None else 64)
    return PeerDefaults(
        dataset=dataset,
        published=published,
        zero=ZeroConfig(),
        mta=MTAConfig(),
        tda=tda,
        boost=BoostConfig(cache=boost_cache, delta=row.delta or 0),
        dmn=DMNConfig(),
        sources={
            "zero": (Source(*ZERO, "ttas/zero.py"),),
            "mta": (Source(*MTA, "main.py"), Source(*MTA, "mta.py")),
            "tda": (Source(*TDA, f"configs/{row.config}.yaml"), Source(*TDA, "utils.py")),
            "boost": (
                Source(*BOOST, f"configs/{row.config}.yaml"),
                Source(*BOOST, "utils.py"),
                Source(*BOOST, "runner.py"),
            ),
            "dmn": (
                Source(*DMN, "scripts/run.sh"),
                Source(*DMN, "dmn_main.py"),
                Source(*TTA_VLM, "online_method/dmn.py"),
            ),
        },
    )
