"""What the commands print: summaries of the dicts the Python API returns."""

from __future__ import annotations

from typing import Any

from ratta.summary import format_results as format_results


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
