"""``--precision fp16`` (``export/precision.py``): the float16 file runs, its masks and top-1 stay
within the stated bounds of the float32 file's, the measured figures travel in its metadata, the
in-graph path gives its numpy path's masks, and a conversion that misses the bounds is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from vit_explain.errors import ExportError
from vit_explain.runtime import Explainer

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def half_file(export_family, tmp_path_factory):
    from vit_explain.export import precision

    exported = export_family("deit")
    half, metadata, parity = precision.convert_checked(onnx.load(str(exported.path)), exported.metadata)
    path = tmp_path_factory.mktemp("fp16") / "deit_fp16.onnx"
    onnx.save(half, str(path))
    return exported, path, metadata, parity


def test_the_float16_file_is_float16_and_within_its_bounds(half_file):
    from vit_explain.export.precision import MASK_BOUND

    exported, path, metadata, parity = half_file
    model = onnx.load(str(path))
    sizes = {kind: sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == kind)
             for kind in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    # the weights are half (layer norms' scales and biases stay float32), not just relabelled
    assert sizes[onnx.TensorProto.FLOAT16] > 20 * sizes[onnx.TensorProto.FLOAT]
    assert parity.holds() and parity.top1_agreement == 1.0
    assert 0 < max(parity.mask_max_diff.values()) <= MASK_BOUND  # half precision does move the masks
    stored = metadata.extra["precision"]
    assert stored["dtype"] == "fp16" and stored["mask_max_diff"] == parity.mask_max_diff
    rng = np.random.default_rng(7)  # inputs other than the check's
    pixels = rng.standard_normal((3, *metadata.preprocess.input_size)).astype(np.float32)
    with Explainer(exported.path, device="cpu", threads=1) as full, Explainer(path, device="cpu", threads=1) as half, \
            Explainer(path, device="cpu", threads=1, method_in_graph=True) as half_in_graph:
        assert half.metadata.extra["precision"]["dtype"] == "fp16"
        for method, categories in (("rollout", None), ("grad_rollout", [3, 1, 4]), ("gae", [3, 1, 4])):
            want = full.explain(pixels, method=method, category_index=categories)
            got = half.explain(pixels, method=method, category_index=categories)
            assert np.abs(got.masks - want.masks).max() <= MASK_BOUND
            assert (got.logits.argmax(axis=1) == want.logits.argmax(axis=1)).all()
            in_graph = half_in_graph.explain(pixels, method=method, category_index=categories)
            assert np.abs(in_graph.masks - got.masks).max() <= 1e-5


def test_a_conversion_outside_the_bounds_is_refused(export_family, monkeypatch):
    from vit_explain.export import precision

    exported = export_family("deit")
    monkeypatch.setattr(precision, "MASK_BOUND", 1e-7)  # float16 cannot keep masks this close
    with pytest.raises(ExportError, match="--precision fp16 refused: float16 vs float32 on 4 inputs: masks rollout"):
        precision.convert_checked(onnx.load(str(exported.path)), exported.metadata)


@pytest.mark.slow
def test_export_model_writes_a_checked_float16_file(tmp_path, make_test_model):
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec

    model = make_test_model("deit_tiny_patch16_224", depth=1, img_size=64)
    result = export_model(ModelSpec("deit_tiny_patch16_224", weights="random", img_size=(64, 64)),
                          tmp_path / "half.onnx", model=model, precision="fp16")
    assert result.metadata.extra["precision"]["dtype"] == "fp16"
    with Explainer(result.path, device="cpu", threads=1) as explainer:
        assert explainer.explain(np.zeros((1, 3, 64, 64), np.float32)).masks.shape == (1, 4, 4)
    with pytest.raises(ExportError, match="precision must be one of fp32, fp16"):
        export_model(ModelSpec("deit_tiny_patch16_224", weights="random"), tmp_path / "x.onnx", model=model,
                     precision="bf16")


def test_the_cli_passes_the_precision_and_names_the_file(monkeypatch, tmp_path):
    """``vit-explain export --precision fp16`` asks export_model for float16 and writes ``*_fp16.onnx``."""
    from click.testing import CliRunner

    import vit_explain.export as export_package
    from vit_explain.cli import main

    seen = {}

    def fake_export(spec, output, class_names_file=None, opset=20, precision="fp32"):
        seen.update(output=output, precision=precision)

        class Result:
            path = output
        return Result()

    monkeypatch.setattr(export_package, "export_model", fake_export)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "deit_tiny_patch16_224", "--weights", "random", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert seen["precision"] == "fp16" and str(seen["output"]).endswith("deit_tiny_patch16_224_random0_fp16.onnx")
    refused = CliRunner().invoke(main, ["export", "deit_tiny_patch16_224", "--precision", "bf16"])
    assert refused.exit_code == 2 and "bf16" in refused.output
