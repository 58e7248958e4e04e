"""transformers' Swin (``SwinForImageClassification``), saved with ``save_pretrained`` and exported
from the folder, against eager transformers and the dense oracle.

transformers pads a stage's grid to whole windows *before* the cyclic shift (timm after), so the
80 px model here (20x20 grid padded to 24x24, shift 3; 10x10 padded to 12x12, shift 3) puts other
tokens in the shifted windows than timm's would: the oracle finds the slots with transformers' own
``maybe_pad`` / ``cyclic_shift`` / ``window_partition``, and a test shows the two orders differ.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.hf_models import HFFamily
from tests.helpers.swin_reference import dense_swin_rows, eager_maps, hf_structure, scaled

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vit_explain.errors import ExportError  # noqa: E402
from vit_explain.export.exporter import export_model  # noqa: E402
from vit_explain.families import FAMILIES, ModelSpec  # noqa: E402
from vit_explain.families.hf_swin import HF_SWIN  # noqa: E402
from vit_explain.families.hf_vit import HFTaps, wrap_hf_model  # noqa: E402
from vit_explain.methods.windowed import slot_tokens  # noqa: E402
from vit_explain.runtime import Explainer  # noqa: E402
from vit_explain.windowing import layout_of  # noqa: E402

#: The tests on the exported file share one export (~40 s on the shared 2-core machine): slow.
slow = pytest.mark.slow

TOLERANCE = 1e-5
HF_SWIN_FAMILY = HFFamily(
    "hf-swin", "SwinConfig", "SwinForImageClassification",
    dict(image_size=80, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=6, num_labels=10),
    "ViTImageProcessor", dict(size={"height": 80, "width": 80}), seed=21, head_gain=1000.0,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = HF_SWIN_FAMILY.save(tmp_path_factory.mktemp("hf-swin") / "swin")
    spec = ModelSpec(str(folder), weights="pretrained", family="hf")
    model = FAMILIES["hf"].build(spec)
    path = folder.parent / "hf-swin.onnx"
    result = export_model(spec, path, model=model)
    with Explainer(path, device="cpu", threads=1) as explainer:
        yield model, result, explainer


def _inputs(batch: int, seed: int):
    pixels = torch.randn(batch, 3, 80, 80, generator=torch.Generator().manual_seed(seed))
    classes = [3, 8, 1][:batch]
    weights = torch.zeros(batch, 10)
    weights[torch.arange(batch), torch.tensor(classes)] = 1.0
    return pixels, classes, weights


@slow
def test_the_file_says_pad_before_shift_and_the_slots_follow_transformers(exported):
    model, result, _ = exported
    layout = layout_of(result.metadata)
    assert layout.pad_before_shift and layout.stage_grids == ((20, 20), (10, 10))
    assert [b.shift for b in layout.blocks] == [(0, 0), (3, 3), (0, 0), (3, 3)]
    structure = hf_structure(model)
    for index, spec in enumerate(layout.blocks):
        grid = layout.stage_grids[spec.stage]
        ours = slot_tokens(grid, spec.window, spec.shift, True)
        np.testing.assert_array_equal(np.where(ours == grid[0] * grid[1], -1, ours), structure.ids[index])
        if any(spec.shift):  # timm's order (roll, then pad) would put other tokens in the windows
            assert not np.array_equal(ours, slot_tokens(grid, spec.window, spec.shift, False))


@slow
@pytest.mark.parametrize("seed, batch", [(0, 1), (1, 3)])
def test_graph_matches_eager_transformers(exported, seed, batch, parity_record):
    model, _, explainer = exported
    pixels, _, weights = _inputs(batch, seed)
    logits, attentions, gradients = eager_maps(model, pixels, weights, HFTaps(capture_gradients=True))
    graph = explainer.session.run_layers(pixels.numpy(), weights.numpy())
    for name, ours, theirs in (("logits", [graph.logits], [logits]), ("attentions", graph.attentions, attentions),
                               ("gradients", graph.gradients, gradients)):
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape
            error = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())
            parity_record("hf-swin", name, error)
            assert error <= TOLERANCE, name
    assert max(float(np.abs(g).max()) for g in gradients) > 0


@slow
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method, fusion, discard", [
    ("rollout", "max", 0.9), ("rollout", "mean", 0.0), ("rollout", "min", 0.5),
    ("grad_rollout", "mean", 0.9), ("grad_rollout", "max", 0.0), ("grad_rollout", "min", 0.5), ("gae", None, None),
    ("attention", "mean", None), ("attention", "max", None), ("attention", "min", None),
])
def test_explainer_masks_match_the_dense_reference(exported, method, fusion, discard, batch, parity_record):
    model, _, explainer = exported
    structure = hf_structure(model)
    pixels, classes, weights = _inputs(batch, 7)
    result = explainer.explain(pixels.numpy(), method, fusion, discard, classes if method in ("grad_rollout", "gae") else None)
    graph = explainer.session.run_layers(pixels.numpy(), weights.numpy())
    reference = dense_swin_rows(structure, graph.attentions, graph.gradients, method, result.head_fusion, discard or 0.0)
    error = float(np.abs(result.masks - scaled(reference).reshape(result.masks.shape)).max())
    parity_record("hf-swin", "masks (graph tensors)", error)
    assert error <= TOLERANCE
    assert scaled(reference).min() < 0.9  # a map with structure, not a flat one
    if not discard:
        _, attentions, gradients = eager_maps(model, pixels, weights, HFTaps(capture_gradients=True))
        eager = dense_swin_rows(structure, attentions, gradients, method, result.head_fusion, 0.0)
        error = float(np.abs(result.masks - scaled(eager).reshape(result.masks.shape)).max())
        parity_record("hf-swin", "masks (eager, discard 0)", error)
        assert error <= TOLERANCE


def test_swin_v2_from_transformers_is_refused_with_one_line():
    import transformers

    config = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[1], window_size=4)
    with pytest.raises(ExportError) as error:
        wrap_hf_model(transformers.Swinv2ForImageClassification(config))
    assert "'swinv2' is not supported" in str(error.value) and "swin" in str(error.value) and "\n" not in str(error.value)
    assert HF_SWIN.name == "hf_swin"
