"""Report figures (matplotlib, PNG): readable on their own, without the tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratta.files import atomic_path

FIGSIZE = (8.0, 4.5)
DPI = 100


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    fig.clf()


def plot_gain(agg: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> None:
    """Bar chart: top-1 gain of RA-TTA over CuPL per dataset (mean over seeds, std bars)."""
    plt = pyplot()
    names = [d for d in agg if "ratta" in agg[d] and "cupl" in agg[d]]
    gains = [agg[d]["ratta"][0] - agg[d]["cupl"][0] for d in names]
    errs = [agg[d]["ratta"][1] for d in names]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    colors = ["tab:green" if g >= 0 else "tab:red" for g in gains]
    ax.bar(range(len(names)), gains, yerr=errs, color=colors, capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("top-1 gain of RA-TTA over CuPL (points)")
    ax.set_title("RA-TTA vs CuPL zero-shot, per dataset")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_sweep(
    xs: Sequence[float],
    series: Sequence[tuple[str, Sequence[float], Sequence[float] | None, str | None]],
    xlabel: str,
    dataset: str,
    path: Path,
) -> None:
    """Line chart: top-1 of each series (label, values, std or None, matplotlib style)
    against one hyperparameter."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, ys, errs, style in series:
        if errs is not None:
            ax.errorbar(xs, ys, yerr=errs, fmt=style or "o-", capsize=3, label=name)
        else:
            ax.plot(xs, ys, style or "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{dataset}: accuracy against {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
