"""Smoke test of ``benchmarks/gpu.py``: it runs on the CPU provider and reports both paths (no timing assertions)."""

from __future__ import annotations

import shutil

import pytest


@pytest.mark.slow
def test_the_device_report_runs_on_the_cpu(export_family, tmp_path, capsys):
    from benchmarks import gpu

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(export_family("deit").path, models / "deit_tiny_patch16_224_random0.onnx")
    report = tmp_path / "report.md"
    assert gpu.main(["--device", "cpu", "--models", "deit_tiny_patch16_224", "--batch-sizes", "2",
                     "--methods", "rollout,grad_rollout", "--threads", "1", "--repeats", "1",
                     "--models-dir", str(models), "--output", str(report)]) == 0
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| deit_tiny_patch16_224 |")]
    assert len(rows) == 4  # two methods x two paths
    assert {row.split("|")[4].strip() for row in rows} == {"numpy", "in-graph"}
    diffs = [float(part.split(": ")[1]) for part in text.split("largest difference per case: ")[1].splitlines()[0].split(", ")]
    assert max(diffs) <= 1e-5  # the two paths' masks agree in the benchmark too
