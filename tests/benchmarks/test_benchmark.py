"""Smoke test of the benchmark harness: rows are well formed (no timing assertions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL = "deit_tiny_patch16_224"
MODEL_KWARGS = {"depth": 1}
SEED = 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A depth-1 DeiT-tiny exported with the weights the benchmark's reference will rebuild."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec

    torch.manual_seed(SEED)
    model = timm.create_model(MODEL, pretrained=False, **MODEL_KWARGS)
    path = tmp_path_factory.mktemp("bench") / "deit_tiny_depth1.onnx"
    export_model(ModelSpec(MODEL, weights="random", seed=SEED), path, model=model)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("bench-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(300, 240), (224, 224)]):
        path = directory / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_rows_are_well_formed(tiny_model, images):
    from benchmarks.harness import PIPELINES, BenchRow, format_table, run_benchmark

    rows = run_benchmark(
        MODEL, tiny_model, images, batch_sizes=(1, 2), threads=1, repeats=1,
        warmup=0, model_kwargs=MODEL_KWARGS, seed=SEED, pause_s=0.0,
    )
    assert [(r.method, r.batch_size) for r in rows] == [
        ("rollout", 1), ("rollout", 2), ("grad_rollout", 1), ("grad_rollout", 2)
    ]
    for row in rows:
        assert isinstance(row, BenchRow)
        assert row.model == MODEL and row.threads == 1 and row.device == "cpu" and row.repeats == 1
        for name in PIPELINES:
            stats = getattr(row, name)
            assert len(stats.times_s) == len(stats.cpu_times_s) == 1 and stats.median_s > 0 and stats.median_cpu_s >= 0
            assert stats.peak_rss_mib >= stats.loaded_rss_mib > 0
            assert stats.working_mib >= 0
        assert row.reference.peak_rss_mib > row.runtime.peak_rss_mib  # the runtime process has no torch
        for value in (row.speedup, row.reference_images_per_s, row.runtime_images_per_s, row.outside_graph_share):
            assert math.isfinite(value)
        assert row.outside_graph_share < 1
        # Same weights on both sides, so the benchmark really compares like with like.
        assert row.mask_max_abs_diff is not None and row.mask_max_abs_diff < 1e-3
        assert not any("torch was imported" in note for note in row.notes)
        assert row.to_dict()["speedup"] == row.speedup

    table = format_table(rows)
    assert table.count("| rollout |") == 6 and table.count("| grad_rollout |") == 6  # latency, CPU, memory


def test_bad_arguments_are_refused(tmp_path):
    from benchmarks.harness import run_benchmark

    with pytest.raises(FileNotFoundError):
        run_benchmark(MODEL, tmp_path / "missing.onnx", [tmp_path / "x.png"])
    with pytest.raises(ValueError, match="methods"):
        run_benchmark(MODEL, tmp_path / "missing.onnx", [tmp_path / "x.png"], methods=("saliency",))
    with pytest.raises(ValueError, match="device"):
        run_benchmark(MODEL, tmp_path / "missing.onnx", [tmp_path / "x.png"], device="tpu")
