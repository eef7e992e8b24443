"""`ratta demo --embeddings`: the offline synthetic run (the world demo: tests/test_world.py)."""

from __future__ import annotations

import json

from ratta.cli import main


def test_demo_writes_real_files_and_reports_both_accuracies(tmp_path, capsys) -> None:
    assert main(["demo", "--embeddings", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "zero-shot" in out and "RA-TTA" in out
    summary = json.loads((tmp_path / "predictions.safetensors.json").read_text())
    assert summary["counts"]["images"] == 400
    assert f"{summary['metrics']['ratta']['top1']:6.2f}%" in out
    for name in ("features.safetensors", "text.safetensors", "db.npy"):
        assert (tmp_path / name).is_file()
