"""The runtime's rows-only windowed maths against the dense float64 oracle, on the same tensors.

The tensors are the eager timm model's own window attentions and gradients (hooked as the
exporter hooks them); the oracle (:mod:`tests.helpers.swin_reference`) builds every ``M``, ``P``
and ``a`` as a full matrix, finds window slots with timm's own roll / pad / partition, and
multiplies. Both sides see the same float32 inputs, so they must agree to float64 rounding; the
bound is the project's mask tolerance, 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.swin_reference import dense_swin_rows, eager_maps, scaled, slot_ids, swin_blocks
from tests.swin.models import CONFIGS

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from vit_explain.families.timm_swin import SWIN  # noqa: E402
from vit_explain.methods import resolve_settings  # noqa: E402
from vit_explain.methods.chain import LayerMaps  # noqa: E402
from vit_explain.methods.registry import get_method  # noqa: E402
from vit_explain.methods.windowed import slot_tokens  # noqa: E402
from vit_explain.windowing import WindowedLayout  # noqa: E402

TOLERANCE = 1e-5
CASES = [
    pytest.param(method, fusion, discard, id=f"{method}-{fusion}-{discard}")
    for method in ("rollout", "grad_rollout")
    for fusion in ("mean", "min", "max")
    for discard in (0.0, 0.5, 0.9)
] + [pytest.param("gae", None, None, id="gae"), *(pytest.param("attention", f, None, id=f"attention-{f}") for f in ("mean", "min", "max"))]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """A model, its layout, and eager maps for batches of 1 and 3 (a different class per image)."""
    model = CONFIGS[request.param].build()
    size = model.patch_embed.img_size
    layout = WindowedLayout.from_dict(SWIN.windows(model))
    batches = {}
    for batch, seed in ((1, 11), (3, 12)):
        pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
        weights = torch.zeros(batch, 10)
        weights[torch.arange(batch), torch.tensor([3, 7, 1][:batch])] = 1.0
        batches[batch] = eager_maps(model, pixels, weights)
    return request.param, model, layout, batches


def _runtime_rows(layout, attentions, gradients, method, fusion, discard, start_layer=0):
    settings = resolve_settings(method, fusion, discard, start_layer, num_layers=len(layout.blocks))
    record = get_method(method)
    maps = LayerMaps(attentions, gradients if record.class_specific else None)
    return record.relevance_for(True)(maps, settings, layout), settings


def test_slot_tokens_follow_timms_roll_pad_and_partition(case):
    _, model, layout, _ = case
    for index, block in enumerate(swin_blocks(model)):
        spec = layout.blocks[index]
        grid = layout.stage_grids[spec.stage]
        ours = slot_tokens(grid, spec.window, spec.shift)
        ours = np.where(ours == grid[0] * grid[1], -1, ours)
        np.testing.assert_array_equal(ours, slot_ids(block))


def test_the_layouts_cover_shift_padding_and_odd_merges(case):
    key, _, layout, _ = case
    shifted_and_padded = [
        b for i, b in enumerate(layout.blocks) if any(b.shift) and layout.padded(i) != layout.stage_grids[b.stage]
    ]
    assert shifted_and_padded, "a block must be both shifted and padded"
    if key == "three-stage":
        assert any(grid[0] % 2 for grid in layout.stage_grids[:-1]), "an odd grid must be merged"


@pytest.mark.parametrize("method, fusion, discard", CASES)
def test_rows_match_the_dense_float64_reference(case, method, fusion, discard):
    _check_against_reference(case, method, fusion, discard, 0)


@pytest.mark.parametrize("method, fusion, discard", [("rollout", "max", 0.9), ("grad_rollout", "mean", 0.5), ("gae", None, None)])
@pytest.mark.parametrize("start_layer", [1, 2])
def test_start_layer_leaves_the_first_blocks_out_as_the_reference_does(case, method, fusion, discard, start_layer):
    _check_against_reference(case, method, fusion, discard, start_layer)


def _check_against_reference(case, method, fusion, discard, start_layer):
    _, model, layout, batches = case
    for _logits, attentions, gradients in batches.values():
        rows, settings = _runtime_rows(layout, attentions, gradients, method, fusion, discard, start_layer)
        reference = dense_swin_rows(
            model, attentions, gradients, method, settings.head_fusion, settings.discard_ratio or 0.0, start_layer
        )
        assert rows.shape == reference.shape == (attentions[0].shape[0], layout.num_tokens)
        assert np.abs(scaled(rows) - scaled(reference)).max() <= TOLERANCE
        # The unscaled rows too: rollout's is a probability vector over the first stage.
        assert np.abs(rows - reference).max() <= TOLERANCE * np.abs(reference).max()


@pytest.mark.parametrize("method", ["rollout", "grad_rollout", "gae", "attention"])
def test_the_maps_are_far_from_uniform(case, method):
    """A uniform map would hide a wrong shift, merge or layer order: every map used above varies
    across the image by at least 10%."""
    _, _, layout, batches = case
    _, attentions, gradients = batches[3]
    rows, _ = _runtime_rows(layout, attentions, gradients, method, None, None)
    assert scaled(rows).min(axis=1).max() < 0.9


def test_a_wrong_shift_would_be_caught(case):
    """The comparison has teeth: the same maths with the shifts ignored differs from the oracle."""
    _, model, layout, batches = case
    _, attentions, gradients = batches[3]
    unshifted = WindowedLayout(layout.stage_grids, tuple(b.__class__(b.stage, b.window, (0, 0), b.heads) for b in layout.blocks))
    rows, settings = _runtime_rows(unshifted, attentions, None, "rollout", "mean", 0.0)
    reference = dense_swin_rows(model, attentions, None, "rollout", "mean", 0.0)
    assert np.abs(scaled(rows) - scaled(reference)).max() > 100 * TOLERANCE


def test_each_image_of_a_batch_is_its_own(case):
    """Batch of three: each image's rows equal those computed for it alone."""
    _, _, layout, batches = case
    _, attentions, gradients = batches[3]
    for method, fusion, discard in (("rollout", "max", 0.9), ("grad_rollout", "mean", 0.5), ("gae", None, None)):
        together, _ = _runtime_rows(layout, attentions, gradients, method, fusion, discard)
        for item in range(3):
            alone, _ = _runtime_rows(
                layout, [a[item : item + 1] for a in attentions], [g[item : item + 1] for g in gradients], method, fusion, discard
            )
            np.testing.assert_allclose(together[item : item + 1], alone, rtol=1e-12, atol=0)
