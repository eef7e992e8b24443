"""What the commands print: summaries of the dicts the Python API returns."""

from __future__ import annotations

from typing import Any


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
    lines.append(
        f"time {summary['timings_s']['total']:.2f} s ({summary['ms_per_image']:.2f} ms/image)"
    )
    return "\n".join(lines)


def print_shards(summary: dict[str, Any]) -> None:
    if "shards" in summary:
        print(f"shards: {summary['shards']['summary']}")


def print_encoding_report(summary: dict[str, Any], kept_in: str, listed: int = 10) -> None:
    """The images an encoding run skipped (the first ``listed``), then its shard line."""
    skipped = summary["skipped_images"]
    for item in skipped[:listed]:
        print(f"  skipped {item['path']}: {item['error']}")
    if len(skipped) > listed:
        print(f"  ... and {len(skipped) - listed:,} more ({kept_in})")
    print_shards(summary)
