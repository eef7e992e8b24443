"""Published figures: data with sources, and reports that compare like with like."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ratta.published
from ratta.evaluate import ALL_DATASETS, markdown_report
from ratta.published import (
    FIGURES,
    NAMES,
    SHIFTS,
    TRANSFER,
    published,
    published_average,
    sources_of,
)


def test_every_figure_names_a_known_method_dataset_and_source() -> None:
    for f in FIGURES:
        assert f.method in NAMES and set(f.datasets) <= set(ALL_DATASETS), f
        assert 0 < f.top1 < 100 and f.sources and not f.derived, f
        for s in f.sources:
            assert s.citation and s.where, f
    keys = [(f.method, f.datasets) for f in FIGURES]
    assert len(keys) == len(set(keys)), "a figure is given twice"


def test_figures_are_typed_as_numbers_not_computed() -> None:
    """Every number in the table is a literal: no arithmetic such as ``73.09 * 0 + 32.22``."""
    tree = ast.parse(Path(ratta.published.__file__).read_text())
    table = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "FIGURES"
    )
    assert not [n for n in ast.walk(table) if isinstance(n, ast.BinOp)]


def test_figures_of_the_logs_and_the_peers() -> None:
    ratta_fgvc = published("ratta", "fgvc_aircraft")
    assert ratta_fgvc is not None and ratta_fgvc.top1 == 32.22
    assert ratta_fgvc.sources[0].commit == "0e0c95d531dc524ad14042e9730df9696c0480c5"
    assert published("cupl", "imagenet_adversarial").top1 == 50.23
    dmn = published("dmn_zs", "dtd")
    assert dmn.top1 == 54.61 and "test labels" in dmn.sources[0].caveat
    assert published("boostadapter", "imagenet_adversarial").top1 == 64.53
    assert published("boostadapter", "imagenet") is None
    assert published("mta", "dtd") is None and published("zero", "dtd") is None
    assert published("tda", "caltech256") is None  # no peer publishes it


def test_a_stated_average_only_over_exactly_its_datasets() -> None:
    assert published_average("ratta", TRANSFER).top1 == 73.09
    assert published_average("ratta", list(reversed(SHIFTS))).top1 == 63.47
    assert published_average("cupl", TRANSFER).top1 == 70.81
    assert published_average("cupl", SHIFTS) is None
    # a subset is not the 13-dataset average, and an unpublished dataset leaves a hole
    assert published_average("cupl", ["dtd", "fgvc_aircraft"]) is None
    assert published_average("ratta", TRANSFER[:-1]) is None
    assert published_average("ratta", []) is None


def test_a_derived_average_is_the_mean_of_published_figures_and_says_so() -> None:
    mean = published_average("tda", ["dtd", "fgvc_aircraft"])
    assert mean.derived and mean.top1 == pytest.approx((47.40 + 23.91) / 2)
    one = published_average("ratta", ["fgvc_aircraft"])
    assert one == published("ratta", "fgvc_aircraft") and not one.derived
    assert sources_of([mean, None, mean]) == list(mean.sources)


def _report(datasets: list[str], model: str = "ViT-B-16", pretrained: str = "openai") -> dict:
    rows = [
        {"dataset": d, "seed": 0, "method": m, "top1": 50.0}
        for d in datasets
        for m in ("clip", "ensemble", "cupl", "retrieval", "ratta")
    ]
    return {
        "rows": rows,
        "seeds": [0],
        "backbone": {"model": model, "pretrained": pretrained},
        "failures": [],
    }


def _line(md: str, start: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_results_md_shows_published_figures_only_beside_the_same_datasets() -> None:
    md = markdown_report(_report(["dtd", "fgvc_aircraft"]))
    assert _line(md, "| fgvc_aircraft |")[-3:] == ["28.98", "32.22", "+17.78"]
    assert _line(md, "| dtd |")[-3:] == ["–", "–", "–"]
    assert _line(md, "| Average (2 of 13) |")[-3:] == ["–", "–", "–"]
    assert "70.81" not in md and "73.09" not in md
    assert "kaist-dmlab/RA-TTA" in md and "commit 0e0c95d531dc" in md
    assert "compare them with care" not in md


def test_results_md_shows_the_papers_averages_over_all_thirteen() -> None:
    md = markdown_report(_report(list(TRANSFER)))
    assert _line(md, "| Average (13 of 13) |")[-3:] == ["70.81", "73.09", "-23.09"]
    assert "openreview.net" in md


def test_results_md_average_of_one_dataset_and_another_backbone() -> None:
    md = markdown_report(_report(["fgvc_aircraft", "imagenet_adversarial"], model="RN50"))
    # one dataset per section: its own figures are the average
    assert _line(md, "| Average (1 of 4) |")[-3:] == ["50.23", "59.55", "-9.55"]
    assert "compare them with care" in md
