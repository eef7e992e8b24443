"""Plain-text summaries of a run, shared by the command line and the files it writes."""

from __future__ import annotations

from typing import Any


def format_times(total: float, stages: dict[str, float]) -> str:
    """``time 41.20 s: extract 30.10 s, text 8.00 s, adapt 3.10 s``: the whole command's
    wall time, then each stage's, by name."""
    parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stages.items())
    return f"time {total:.2f} s" + (f": {parts}" if parts else "")


def format_results(summary: dict[str, Any]) -> str:
    """A short results table for stdout."""
    c = summary["counts"]
    lines = [
        f"images {c['images']}  classes {c['classes']}  views {c['views']}  "
        f"database {c['database']}  adapted {c['adapted']}  fallback {c['fallback']}  "
        f"mean candidates {c['mean_candidates']:.2f}",
    ]
    metrics = summary.get("metrics")
    if metrics:
        lines.append(f"{'method':<12}{'top-1':>8}{'top-5':>8}")
        for name, label in (
            ("zero_shot", "zero-shot"),
            ("retrieval", "retrieval"),
            ("ratta", "RA-TTA"),
        ):
            m = metrics[name]
            lines.append(f"{label:<12}{m['top1']:>8.2f}{m['top5']:>8.2f}")
    else:
        lines.append("no labels in the features file: accuracy not computed")
    full = summary.get("metrics_full_split")
    if full:
        lines.append(
            f"over the whole split of {summary['split_images']} images, the "
            f"{summary['skipped']} unreadable ones counted as errors:"
        )
        for name, label in (("zero_shot", "zero-shot"), ("ratta", "RA-TTA")):
            lines.append(f"{label:<12}{full[name]['top1']:>8.2f}{full[name]['top5']:>8.2f}")
    stages = summary.get("stage_seconds")
    if stages:
        lines.append(format_times(summary["run_seconds"], stages))
    else:
        lines.append(
            f"time {summary['timings_s']['total']:.2f} s ({summary['ms_per_image']:.2f} ms/image)"
        )
    return "\n".join(lines)
