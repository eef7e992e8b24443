"""Published ViT-B/16 top-1 figures (%) of RA-TTA and its peers, as data with their sources.

One table for every method a report compares against, keyed by stable method keys
(``clip``, ``ensemble``, ``cupl``, ``ratta``, ``tda``, ``dmn_zs``, ``boostadapter``, ``mta``,
``zero``) and ratta's dataset names (:mod:`ratta.presets`). Every figure names where it was
read: a paper's table, or a log file at a commit of the authors' repository. Reports
compare like with like: :func:`published_average` gives an average only over exactly the
datasets asked for (the one a source states, else the mean of the per-dataset figures
when every one of them is published), never a 13-dataset average beside a 2-dataset one.

Torch-free.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

# The paper's table layout: 13 transfer datasets (ImageNet among them) and 4 ImageNet shifts.
TRANSFER = (
    "imagenet",
    "caltech101",
    "caltech256",
    "dtd",
    "fgvc_aircraft",
    "food101",
    "flowers102",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
    "cub200",
    "resisc45",
)
SHIFTS = ("imagenet_v2", "imagenet_sketch", "imagenet_adversarial", "imagenet_rendition")

NAMES = {
    "clip": "CLIP ('a photo of a {}.')",
    "ensemble": "Template ensemble",
    "cupl": "CuPL",
    "ratta": "RA-TTA",
    "tda": "TDA",
    "dmn_zs": "DMN-ZS",
    "boostadapter": "BoostAdapter",
    "mta": "MTA",
    "zero": "ZERO",
}


@dataclass(frozen=True)
class Source:
    """Where figures were read: ``citation`` (who), ``where`` (table or file), ``commit``
    (of the repository holding the file), ``caveat`` (what makes them not comparable as
    they stand), shown beside the figures in reports."""

    citation: str
    where: str
    commit: str | None = None
    caveat: str | None = None

    def describe(self) -> str:
        text = f"{self.citation}: {self.where}"
        if self.commit:
            text += f" (commit {self.commit[:12]})"
        return text + (f"; {self.caveat}" if self.caveat else "")


@dataclass(frozen=True)
class Figure:
    """A published top-1 (%) of ``method`` on ``datasets``: one dataset, or the datasets an
    average covers. ``derived``: the mean of per-dataset figures, not a stated one."""

    method: str
    datasets: tuple[str, ...]
    top1: float
    sources: tuple[Source, ...]
    derived: bool = False


RATTA_PAPER = Source(
    "Lee et al., RA-TTA, ICLR 2025 "
    "(openreview.net/pdf/86d3293ab2d788dc7a7a4cd22a101eba7e501237.pdf)",
    "the ViT-B/16 averages of its transfer-dataset (13) and ImageNet-shift (4) tables",
)
RATTA_LOGS = Source(
    "kaist-dmlab/RA-TTA, the authors' logs",
    "logs/ratta/ViT-B_16/fgvc_aircraft_log.txt and imagenet_adversarial_log.txt, last "
    "'Dataset:' lines (the logs were removed in the next commit, d6adfc3)",
    commit="0e0c95d531dc524ad14042e9730df9696c0480c5",
)
TPT_TABLES = Source(
    "Shu et al., TPT, NeurIPS 2022, as reprinted by Karmanov et al., TDA, CVPR 2024",
    "rows 'CLIP-ViT-B/16' (one template) and 'Ensemble' of the OOD and cross-domain tables",
)
TDA_TABLES = Source(
    "Karmanov et al., TDA, CVPR 2024",
    "ViT-B/16 rows of its OOD and cross-domain benchmark tables",
)
DMN_LOGS = Source(
    "YBZh/DMN, the authors' logs",
    "camera_ready_dmn_tf_searched_vit_0.txt (ImageNet, transfer) and "
    "camera_ready_dmn_tf_shift_0.txt (shifts), 'best acc' lines",
    commit="c6c218c70ebbc701b31cc3d7f7b9597117daad8e",
    caveat="gamma searched on the test labels (authors confirm, YBZh/DMN#2): an oracle",
)
BOOST_SECONDARY = Source(
    "BoostAdapter (Zhang et al., NeurIPS 2024), secondary sources",
    "figures re-reported by later papers, not BoostAdapter's own table",
    caveat="secondary sources",
)


def _per_dataset(method: str, source: Source, top1: dict[str, float]) -> list[Figure]:
    return [Figure(method, (d,), v, (source,)) for d, v in top1.items()]


FIGURES: tuple[Figure, ...] = (
    Figure("ratta", TRANSFER, 73.09, (RATTA_PAPER,)),
    Figure("ratta", SHIFTS, 63.47, (RATTA_PAPER,)),
    Figure("cupl", TRANSFER, 70.81, (RATTA_PAPER,)),
    Figure("ratta", ("fgvc_aircraft",), 32.22, (RATTA_LOGS,)),
    Figure("ratta", ("imagenet_adversarial",), 59.55, (RATTA_LOGS,)),
    Figure("cupl", ("fgvc_aircraft",), 28.98, (RATTA_LOGS,)),
    Figure("cupl", ("imagenet_adversarial",), 50.23, (RATTA_LOGS,)),
    *_per_dataset(
        "clip",
        TPT_TABLES,
        {
            "imagenet": 66.73,
            "imagenet_adversarial": 47.87,
            "imagenet_v2": 60.86,
            "imagenet_rendition": 73.98,
            "imagenet_sketch": 46.09,
            "fgvc_aircraft": 23.67,
            "caltech101": 93.35,
            "stanford_cars": 65.48,
            "dtd": 44.27,
            "flowers102": 67.44,
            "food101": 83.65,
            "oxford_pets": 88.25,
            "sun397": 62.59,
            "ucf101": 65.13,
        },
    ),
    *_per_dataset(
        "ensemble",
        TPT_TABLES,
        {
            "imagenet": 68.34,
            "imagenet_adversarial": 49.89,
            "imagenet_v2": 61.88,
            "imagenet_rendition": 77.65,
            "imagenet_sketch": 48.24,
            "fgvc_aircraft": 23.22,
            "caltech101": 93.55,
            "stanford_cars": 66.11,
            "dtd": 45.04,
            "flowers102": 66.99,
            "food101": 82.86,
            "oxford_pets": 86.92,
            "sun397": 65.63,
            "ucf101": 65.16,
        },
    ),
    *_per_dataset(
        "tda",
        TDA_TABLES,
        {
            "imagenet": 69.51,
            "imagenet_adversarial": 60.11,
            "imagenet_v2": 64.67,
            "imagenet_rendition": 80.24,
            "imagenet_sketch": 50.54,
            "fgvc_aircraft": 23.91,
            "caltech101": 94.24,
            "stanford_cars": 67.28,
            "dtd": 47.40,
            "flowers102": 71.42,
            "food101": 86.14,
            "oxford_pets": 88.63,
            "sun397": 67.62,
            "ucf101": 70.66,
        },
    ),
    *_per_dataset(
        "dmn_zs",
        DMN_LOGS,
        {
            "imagenet": 72.24,
            "imagenet_adversarial": 58.28,
            "imagenet_v2": 65.27,
            "imagenet_rendition": 78.55,
            "imagenet_sketch": 52.98,
            "fgvc_aircraft": 29.85,
            "caltech101": 95.09,
            "stanford_cars": 67.77,
            "dtd": 54.61,
            "flowers102": 74.79,
            "food101": 85.06,
            "oxford_pets": 91.88,
            "sun397": 69.99,
            "ucf101": 72.43,
        },
    ),
    *_per_dataset(
        "boostadapter",
        BOOST_SECONDARY,
        {
            "imagenet_adversarial": 64.53,
            "fgvc_aircraft": 27.45,
            "caltech101": 94.77,
            "stanford_cars": 69.30,
            "dtd": 45.69,
            "flowers102": 71.66,
            "food101": 87.17,
            "oxford_pets": 89.51,
            "sun397": 68.09,
            "ucf101": 71.93,
        },
    ),
    # MTA, ZERO: no per-dataset ViT-B/16 tables were obtained; they have no figures.
)


def published(method: str, dataset: str) -> Figure | None:
    """The published top-1 of ``method`` on ``dataset``, or None."""
    return next(
        (f for f in FIGURES if f.method == method and f.datasets == (dataset,)),
        None,
    )


def published_average(method: str, datasets: Iterable[str]) -> Figure | None:
    """A published average of ``method`` over exactly ``datasets``, or None.

    The average a source states for that set of datasets; else, when every one of them
    has a published figure, their mean (``derived``); else None: an average over other
    datasets is never a stand-in.
    """
    wanted = tuple(dict.fromkeys(datasets))
    if not wanted:
        return None
    for f in FIGURES:
        if f.method == method and len(f.datasets) > 1 and set(f.datasets) == set(wanted):
            return f
    each = [published(method, d) for d in wanted]
    if any(f is None for f in each):
        return None
    figures = [f for f in each if f is not None]
    sources = tuple(dict.fromkeys(s for f in figures for s in f.sources))
    if len(figures) == 1:
        return figures[0]
    return Figure(method, wanted, statistics.fmean(f.top1 for f in figures), sources, derived=True)


def sources_of(figures: Iterable[Figure | None]) -> list[Source]:
    """The distinct sources of ``figures`` (None skipped), in order of appearance."""
    return list(dict.fromkeys(s for f in figures if f is not None for s in f.sources))
