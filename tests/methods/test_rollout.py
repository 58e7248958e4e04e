"""Unit tests of the numpy rollout maths on tiny cases whose answers are worked out by hand.

Each test pins one property the original vit-explain got wrong or that is easy to get wrong in
a vectorised rewrite: row normalisation by each row's own sum, layer order, which layer a
gradient belongs to, clamping after head fusion, the discard step sparing the class token's
self-attention and acting on every image of a batch, and the start vector of models without a
class token. No torch here: these run in the torch-free environment too.
"""

from __future__ import annotations

import numpy as np
import pytest

from vit_explain.methods.chain import scale_to_unit_max
from vit_explain.methods.fusion import fuse_heads
from vit_explain.methods.relevance import rollout_masks, rollout_rows
from vit_explain.methods.selection import discard_lowest


def stack(*layers: np.ndarray) -> np.ndarray:
    """Per-layer ``[N, N]`` (one image, one head) or ``[heads, N, N]`` maps -> ``[L, 1, heads, N, N]``."""
    out = []
    for layer in layers:
        layer = np.asarray(layer, dtype=np.float64)
        if layer.ndim == 2:
            layer = layer[None]
        out.append(layer[None])
    return np.stack(out)


def row_stochastic(rng: np.random.Generator, shape: tuple[int, ...], sharpness: float = 3.0) -> np.ndarray:
    """Random softmax rows, peaky enough that different matrices really differ."""
    logits = rng.normal(size=shape) * sharpness
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def naive_rollout_row(
    attentions: np.ndarray,
    gradients: np.ndarray | None,
    head_fusion: str,
    discard_ratio: float,
    start: np.ndarray,
) -> np.ndarray:
    """Independent, loop-per-image version with the full ``N x N`` product ``a_L @ ... @ a_1``."""
    layers, batch, _, tokens, _ = attentions.shape
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    rows = []
    for item in range(batch):
        product = np.eye(tokens)
        for layer in range(layers):
            maps = attentions[layer, item]
            if gradients is not None:
                fused = np.maximum(fuse(maps * gradients[layer, item], axis=0), 0.0)
            else:
                fused = fuse(maps, axis=0)
            flat = fused.flatten()
            count = int(flat.size * discard_ratio)
            for index in np.argsort(flat, kind="stable")[:count]:
                if index != 0:
                    flat[index] = 0.0
            a = (flat.reshape(tokens, tokens) + np.eye(tokens)) / 2
            a = a / a.sum(axis=1, keepdims=True)
            product = a @ product  # a_l on the left: R = a_L @ ... @ a_1
        rows.append(start[item] @ product)
    return np.stack(rows)


# --------------------------------------------------------------------------- #
# Single layers and hand-computed chains
# --------------------------------------------------------------------------- #


def test_identity_attention_keeps_all_relevance_on_the_class_token():
    """A = I in every layer: rollout is I, the class row is e_0, so every patch gets 0 (and no NaN)."""
    attentions = stack(np.eye(4), np.eye(4), np.eye(4))
    rows = rollout_rows(attentions, None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_array_equal(rows, np.zeros((1, 3)))
    masks = rollout_masks(attentions, None, "mean", 0.0, 1, (1, 3))
    np.testing.assert_array_equal(masks, np.zeros((1, 1, 3), dtype=np.float32))


def test_one_layer_mask_is_half_the_class_row_of_the_attention():
    """One row-stochastic layer: a = (A + I) / 2, so the class row over the patches is A[0, 1:] / 2."""
    attention = np.array(
        [
            [0.1, 0.6, 0.3],
            [0.2, 0.2, 0.6],
            [0.5, 0.25, 0.25],
        ]
    )
    rows = rollout_rows(stack(attention), None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[0.3, 0.15]], rtol=0, atol=1e-15)
    # An identity layer after it changes nothing.
    rows = rollout_rows(stack(attention, np.eye(3)), None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[0.3, 0.15]], rtol=0, atol=1e-15)


def test_three_tokens_two_layers_worked_by_hand():
    """Tokens [cls, p1, p2]; layer 1 then layer 2, both row-stochastic.

    a1 = (A1 + I)/2 = [[.5, .5, 0], [0, 1, 0], [0, 0, 1]]
    a2 = (A2 + I)/2 = [[.5, 0, .5], [.5, .5, 0], [0, .5, .5]]
    e0 @ a2 = [.5, 0, .5];  [.5, 0, .5] @ a1 = [.25, .25, .5]  ->  patches [.25, .5]
    The reversed order e0 @ a1 @ a2 = [.5, .25, .25] would give [.25, .25].
    """
    first = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1]])  # A1
    second = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])  # A2
    rows = rollout_rows(stack(first, second), None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[0.25, 0.5]], rtol=0, atol=1e-15)
    reversed_rows = rollout_rows(stack(second, first), None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(reversed_rows, [[0.25, 0.25]], rtol=0, atol=1e-15)


def test_rows_are_normalised_by_their_own_sums():
    """Fused maps that are not row-stochastic (as after max fusion or discard): each row of
    F + I is divided by its own sum. The original tool divided column j by row j's sum
    (``a / a.sum(dim=-1)`` without keepdim), which gives patches [2/5, 3/2] here.

    Layer 1: F1 + I = [[1,0,0],[0,2,3],[0,0,6]] -> a1 = [[1,0,0],[0,2/5,3/5],[0,0,1]]
    Layer 2: F2 + I = [[1,1,1],[0,1,0],[0,0,1]] -> a2 = [[1/3,1/3,1/3],[0,1,0],[0,0,1]]
    e0 @ a2 @ a1 = 1/3 * ([1,0,0] + [0,2/5,3/5] + [0,0,1]) = [1/3, 2/15, 8/15]
    """
    f1 = np.array([[0, 0, 0], [0, 1, 3], [0, 0, 5]])
    f2 = np.array([[0, 1, 1], [0, 0, 0], [0, 0, 0]])
    rows = rollout_rows(stack(f1, f2), None, "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[2 / 15, 8 / 15]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("head_fusion, expected", [("mean", 0.3), ("max", 0.5), ("min", 0.1)])
def test_head_fusion_is_applied_per_entry_across_heads(head_fusion, expected):
    """Two tokens [cls, p], three heads giving cls->p = 0.1, 0.3, 0.5: fused entry f, then
    a = [[1, f], [0, 2]] row-normalised (the patch row is [0, 1]), so the patch gets f / (1 + f)."""
    heads = np.array([[[0.0, v], [0.0, 1.0]] for v in (0.1, 0.3, 0.5)])
    np.testing.assert_allclose(fuse_heads(heads[None], head_fusion)[0, 0, 1], expected)
    rows = rollout_rows(stack(heads), None, head_fusion, 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[expected / (1 + expected)]], rtol=1e-15)


def test_unknown_head_fusion_is_refused():
    with pytest.raises(ValueError, match="head fusion must be one of"):
        fuse_heads(np.ones((1, 2, 3, 3)), "median")


# --------------------------------------------------------------------------- #
# Layer order on random, non-commuting layers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_chain_is_e0_times_last_layer_first(head_fusion, discard_ratio):
    """rollout_rows == e0 @ a_L @ ... @ a_1 (the full product, computed naively) and differs
    from the reversed chain: four random peaky layers do not commute."""
    rng = np.random.default_rng(7)
    attentions = row_stochastic(rng, (4, 2, 3, 6, 6))
    start = np.zeros((2, 6))
    start[:, 0] = 1.0
    expected = naive_rollout_row(attentions, None, head_fusion, discard_ratio, start)[:, 1:]
    rows = rollout_rows(attentions, None, head_fusion, discard_ratio, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, expected, rtol=1e-12, atol=1e-15)
    reversed_rows = rollout_rows(attentions[::-1].copy(), None, head_fusion, discard_ratio, num_prefix_tokens=1)
    assert np.abs(reversed_rows - rows).max() > 1e-2


# --------------------------------------------------------------------------- #
# Gradient rollout
# --------------------------------------------------------------------------- #


def test_each_gradient_is_paired_with_its_own_layer():
    """G_1 = 1 (layer 1 counts), G_2 = 0 (layer 2 becomes the identity), so the result is layer 1's
    class row. Pairing G_1 with A_2 (as the original's backward-order hooks did) gives layer 2's."""
    first = np.array([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    second = np.array([[0.2, 0.0, 0.8], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    attentions = stack(first, second)
    gradients = stack(np.ones((3, 3)), np.zeros((3, 3)))
    rows = rollout_rows(attentions, gradients, "mean", 0.0, num_prefix_tokens=1)
    # a1 = (A1 + I) / 2: class row [1.2, 0.8, 0] / 2 = [0.6, 0.4, 0]
    np.testing.assert_allclose(rows, [[0.4, 0.0]], rtol=0, atol=1e-15)
    swapped = rollout_rows(attentions, gradients[::-1].copy(), "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(swapped, [[0.0, 0.4]], rtol=0, atol=1e-15)


def test_gradient_rollout_clamps_after_fusing_the_heads():
    """Two heads, tokens [cls, p1, p2]. A * G at cls->p1 is +0.4 and -0.6 (mean -0.1 -> clamped 0),
    at cls->p2 it is +0.2 and +0.2 (mean 0.2); everything else 0.

    F = [[0, 0, .2], 0, 0] -> (F + I) row 0 = [1, 0, .2] / 1.2 -> patches [0, 1/6].
    Clamping each head first would give cls->p1 = 0.2 and patches [1/7, 1/7].
    """
    attention = np.zeros((2, 3, 3))
    attention[:, 0, 1:] = 1.0
    gradient = np.zeros((2, 3, 3))
    gradient[0, 0, 1], gradient[1, 0, 1] = 0.4, -0.6
    gradient[:, 0, 2] = 0.2
    rows = rollout_rows(stack(attention), stack(gradient), "mean", 0.0, num_prefix_tokens=1)
    np.testing.assert_allclose(rows, [[0.0, 1 / 6]], rtol=0, atol=1e-15)


def test_gradient_rollout_matches_the_naive_chain():
    rng = np.random.default_rng(11)
    attentions = row_stochastic(rng, (3, 2, 4, 5, 5))
    gradients = rng.normal(size=attentions.shape)
    start = np.zeros((2, 5))
    start[:, 0] = 1.0
    for head_fusion in ("mean", "max", "min"):
        expected = naive_rollout_row(attentions, gradients, head_fusion, 0.5, start)[:, 1:]
        rows = rollout_rows(attentions, gradients, head_fusion, 0.5, num_prefix_tokens=1)
        np.testing.assert_allclose(rows, expected, rtol=1e-12, atol=1e-15)


def test_gradients_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        rollout_rows(np.ones((2, 1, 1, 3, 3)), np.ones((1, 1, 1, 3, 3)), "mean", 0.0, 1)


# --------------------------------------------------------------------------- #
# Discard
# --------------------------------------------------------------------------- #


def test_discard_zeroes_the_lowest_entries_but_spares_flat_index_zero():
    """int(9 * 0.25) = 2 entries are the lowest: the class token's self-attention (0.01, flat
    index 0) and 0.2 (flat index 4). Only 0.2 is zeroed."""
    fused = np.array([[[0.01, 0.5, 0.6], [0.3, 0.2, 0.9], [0.4, 0.8, 0.7]]])
    expected = fused.copy()
    expected[0, 1, 1] = 0.0
    np.testing.assert_array_equal(discard_lowest(fused.copy(), 0.25), expected)


def test_discard_count_is_the_floor_of_n_squared_times_the_ratio():
    """N = 3, ratio 0.5: int(4.5) = 4 entries go (flat index 0 is not among the lowest here)."""
    fused = np.arange(1.0, 10.0)[::-1].reshape(1, 3, 3).copy()  # 9 at index 0 ... 1 at index 8
    out = discard_lowest(fused.copy(), 0.5)
    np.testing.assert_array_equal(out.flatten(), [9, 8, 7, 6, 5, 0, 0, 0, 0])
    assert discard_lowest(fused.copy(), 0.1).flatten().tolist() == list(fused.flatten())  # int(0.9) = 0


def test_discard_acts_on_every_image_of_the_batch():
    """The original discarded from image 0 only. Here each image loses its own lowest entries."""
    first = np.array([[0.9, 0.1], [0.5, 0.6]])
    second = np.array([[0.9, 0.6], [0.05, 0.7]])
    out = discard_lowest(np.stack([first, second]), 0.25)  # int(4 * 0.25) = 1 entry each
    np.testing.assert_array_equal(out[0], [[0.9, 0.0], [0.5, 0.6]])
    np.testing.assert_array_equal(out[1], [[0.9, 0.6], [0.0, 0.7]])


@pytest.mark.parametrize("size", [4, 60])  # a whole-row selection, and a sampled bracket (3600 entries)
def test_discard_with_ties_at_the_cut_drops_exactly_the_count(size):
    """Photos with flat regions give exactly equal attention values. When the cut falls inside a
    run of equal entries, exactly ``int(N*N*ratio)`` entries go: everything below the cut, then
    tied entries in row order; everything above the cut, and flat index 0, stays."""
    rng = np.random.default_rng(4)
    fused = rng.choice(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32), size=(3, size, size))
    fused[:, 0, 0] = 0.05  # the class token's self-attention: among the lowest, always spared
    flat = fused.reshape(3, -1)
    ratio = 0.5
    count = int(flat.shape[1] * ratio)
    out = discard_lowest(fused.copy(), ratio).reshape(3, -1)
    split_runs = 0
    for item in range(3):
        cut = np.sort(flat[item])[count - 1]
        dropped = out[item] != flat[item]
        assert np.count_nonzero(dropped) == count - 1  # flat index 0 was among the lowest: spared
        assert not dropped[0] and out[item, 0] == flat[item, 0]
        assert np.all(dropped[flat[item] < cut][1:])  # all below the cut go, but flat index 0
        assert not np.any(dropped[flat[item] > cut])
        tied = np.flatnonzero(flat[item] == cut)
        gone = np.flatnonzero(dropped & (flat[item] == cut))
        np.testing.assert_array_equal(gone, tied[: gone.size])  # the first tied ones, in row order
        assert 0 < gone.size <= tied.size
        split_runs += gone.size < tied.size
    assert split_runs > 0  # the cut fell inside a run of ties at least once


def test_discard_with_ties_keeps_nan_entries_last():
    """NaN sorts last (as in ``np.partition``): never among the lowest entries while numbers remain."""
    fused = np.array([[[0.5, np.nan, 0.2], [0.2, 0.2, 0.9], [np.nan, 0.2, 0.7]]])
    out = discard_lowest(fused.copy(), 0.3).reshape(-1)  # int(9 * 0.3) = 2 of the four 0.2 go
    np.testing.assert_array_equal(out, [0.5, np.nan, 0.0, 0.0, 0.2, 0.9, np.nan, 0.2, 0.7])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_discard_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match="discard ratio"):
        discard_lowest(np.ones((1, 2, 2)), ratio)


@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_images_of_a_batch_are_explained_independently(method, discard_ratio):
    """Rows for a batch equal the rows of each image computed alone, bit for bit."""
    rng = np.random.default_rng(3)
    attentions = row_stochastic(rng, (3, 3, 2, 7, 7)).astype(np.float32)
    gradients = rng.normal(size=attentions.shape).astype(np.float32) if method == "grad_rollout" else None
    together = rollout_rows(attentions, gradients, "max", discard_ratio, num_prefix_tokens=2)
    for item in range(3):
        alone = rollout_rows(
            attentions[:, item : item + 1],
            None if gradients is None else gradients[:, item : item + 1],
            "max", discard_ratio, num_prefix_tokens=2,
        )
        np.testing.assert_array_equal(together[item : item + 1], alone)


def test_inputs_are_not_modified():
    """The discard step works in place on its own copy, never on the caller's arrays."""
    rng = np.random.default_rng(5)
    attentions = row_stochastic(rng, (2, 2, 2, 5, 5))
    gradients = rng.normal(size=attentions.shape)
    before = attentions.copy(), gradients.copy()
    for head_fusion in ("mean", "max", "min"):
        rollout_rows(attentions, None, head_fusion, 0.9, 1)
        rollout_rows(attentions, gradients, head_fusion, 0.9, 1)
    np.testing.assert_array_equal(attentions, before[0])
    np.testing.assert_array_equal(gradients, before[1])


# --------------------------------------------------------------------------- #
# Token layout and masks
# --------------------------------------------------------------------------- #


def test_several_prefix_tokens_start_from_the_class_row_and_are_left_out_of_the_mask():
    """Tokens [cls, dist, p1, p2]: the class row is row 0 and the mask covers p1, p2 only."""
    attention = np.array(
        [
            [0.2, 0.4, 0.1, 0.3],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    rows = rollout_rows(stack(attention), None, "mean", 0.0, num_prefix_tokens=2)
    np.testing.assert_allclose(rows, [[0.05, 0.15]], rtol=0, atol=1e-15)


def test_without_a_class_token_the_start_is_the_mean_of_the_patch_rows():
    """Two patches, no prefix: a = [[.5, .5], [0, 1]], mean of the rows = [.25, .75]."""
    attention = np.array([[0.0, 1.0], [0.0, 1.0]])
    rows = rollout_rows(stack(attention), None, "mean", 0.0, num_prefix_tokens=0, has_class_token=False)
    np.testing.assert_allclose(rows, [[0.25, 0.75]], rtol=0, atol=1e-15)
    masks = rollout_masks(stack(attention), None, "mean", 0.0, 0, (1, 2), has_class_token=False)
    np.testing.assert_allclose(masks, [[[1 / 3, 1.0]]], rtol=1e-7)


def test_without_a_class_token_prefix_tokens_are_skipped_in_the_start_vector():
    """Registers but no class token: [r, p1, p2]; the start is the mean of rows p1 and p2 only."""
    attention = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # a = [[1,0,0],[.5,.5,0],[0,0,1]]; mean of rows 1, 2 = [.25, .25, .5]
    rows = rollout_rows(stack(attention), None, "mean", 0.0, num_prefix_tokens=1, has_class_token=False)
    np.testing.assert_allclose(rows, [[0.25, 0.5]], rtol=0, atol=1e-15)


def test_masks_are_row_major_on_the_grid_float32_and_scaled_to_max_one():
    """Six patches on a 2x3 grid: patch k lands at (k // 3, k % 3)."""
    attention = np.eye(7)
    attention[0] = [0.0, 0.1, 0.2, 0.3, 0.05, 0.15, 0.2]
    masks = rollout_masks(stack(attention), None, "mean", 0.0, 1, (2, 3))
    assert masks.dtype == np.float32 and masks.shape == (1, 2, 3)
    expected = np.array([[0.1, 0.2, 0.3], [0.05, 0.15, 0.2]]) / 0.3
    np.testing.assert_allclose(masks[0], expected, rtol=1e-6)
    assert masks.max() == 1.0


def test_grid_that_does_not_fit_the_patch_count_is_refused():
    with pytest.raises(ValueError, match="do not fill a 2x2 grid"):
        rollout_masks(stack(np.eye(4)), None, "mean", 0.0, 1, (2, 2))


def test_scaling_leaves_an_all_zero_row_at_zero():
    scaled = scale_to_unit_max(np.array([[0.0, 0.0, 0.0], [1.0, 4.0, 2.0]]))
    np.testing.assert_array_equal(scaled, [[0, 0, 0], [0.25, 1.0, 0.5]])
    assert not np.isnan(scaled).any()
