"""A case small enough to check on paper: two windows, one shift, one merge.

Stage 0 is a 2x4 grid (tokens 0-3 on the top row, 4-7 below), window 2x2, one head:

- block 0, no shift: windows {0, 1, 4, 5} and {2, 3, 6, 7}, attention uniform (1/4) in each;
- block 1, shifted by (0, 1): timm rolls the grid one column left, so the windows hold the
  original tokens {1, 2, 5, 6} (slots in that order) and {3, 0, 7, 4}; every query attends to its
  window's first slot only, i.e. to token 1 (left) or token 3 (right);
- merge to the 1x2 grid of stage 1, one block with one window, attention uniform (1/2).

Rollout (mean fusion, no discard), by hand, from the last block down:

- seed = [1/2, 1/2]; stage 1's ``a = (M + I)/2`` with ``M = 1/2`` everywhere is
  [[3/4, 1/4], [1/4, 3/4]], so the row stays [1/2, 1/2];
- merge: each of the 8 tokens gets 1/4 of its merged token: 1/8 each;
- block 1: ``a = (M + I)/2`` (each row of ``M + I`` sums to 2); token 1's row is all on itself
  (1), tokens 2, 5, 6 give 1/2 to themselves and 1/2 to token 1; likewise token 3 for 0, 7, 4.
  Token 1 receives 1/8 + 3 x 1/16 = 5/16, token 3 the same, every other token 1/16;
- block 0: ``a[i, j] = 1/2 [i = j] + 1/8`` within a window. Each window's row mass is
  1/16 + 5/16 + 1/16 + 1/16 = 1/2, so every token gets ``q_j / 2 + 1/16``: tokens 1 and 3
  7/32, the others 3/32.

Mask (scaled to max 1): [[3/7, 1, 3/7, 1], [3/7, 3/7, 3/7, 3/7]]. Had the shift not been undone,
the peaks would sit on tokens 0 and 2 (the unshifted windows' first slots).
"""

from __future__ import annotations

import numpy as np

from vit_explain.methods import resolve_settings
from vit_explain.methods.chain import LayerMaps, rows_to_masks
from vit_explain.methods.windowed import attention, gae, rollout, slot_tokens
from vit_explain.windowing import WindowBlock, WindowedLayout

LAYOUT = WindowedLayout(
    stage_grids=((2, 4), (1, 2)),
    blocks=(
        WindowBlock(stage=0, window=(2, 2), shift=(0, 0), heads=1),
        WindowBlock(stage=0, window=(2, 2), shift=(0, 1), heads=1),
        WindowBlock(stage=1, window=(1, 2), shift=(0, 0), heads=1),
    ),
)


def _maps() -> list[np.ndarray]:
    """Per block ``[B=1, windows, heads=1, a, a]`` float32, as the session unpacks them."""
    uniform = np.full((1, 2, 1, 4, 4), 0.25, dtype=np.float32)
    first_slot = np.zeros((1, 2, 1, 4, 4), dtype=np.float32)
    first_slot[..., 0] = 1.0
    last = np.full((1, 1, 1, 2, 2), 0.5, dtype=np.float32)
    return [uniform, first_slot, last]


def test_the_shifted_windows_hold_the_tokens_worked_out_on_paper():
    np.testing.assert_array_equal(slot_tokens((2, 4), (2, 2), (0, 0)), [[0, 1, 4, 5], [2, 3, 6, 7]])
    np.testing.assert_array_equal(slot_tokens((2, 4), (2, 2), (0, 1)), [[1, 2, 5, 6], [3, 0, 7, 4]])


def test_rollout_by_hand():
    settings = resolve_settings("rollout", "mean", 0.0, num_layers=3)
    rows = rollout(LayerMaps(_maps()), settings, LAYOUT)
    np.testing.assert_allclose(rows, [[3 / 32, 7 / 32, 3 / 32, 7 / 32, 3 / 32, 3 / 32, 3 / 32, 3 / 32]], rtol=1e-12)
    mask = rows_to_masks(rows, (2, 4))
    np.testing.assert_allclose(mask[0], [[3 / 7, 1, 3 / 7, 1], [3 / 7] * 4], rtol=1e-6)


def test_start_layer_one_leaves_block_zero_out():
    """Without block 0 the row after block 1 is the answer: [1, 5, 1, 5, 1, 1, 1, 1] / 16."""
    settings = resolve_settings("rollout", "mean", 0.0, 1, num_layers=3)
    rows = rollout(LayerMaps(_maps()), settings, LAYOUT)
    np.testing.assert_allclose(rows[0] * 16, [1, 5, 1, 5, 1, 1, 1, 1], rtol=1e-12)


def test_last_layer_attention_by_hand():
    """The seed through the last block's ``M`` only ([1/2, 1/2] @ M = [1/2, 1/2]), then the merge:
    1/8 on every token."""
    settings = resolve_settings("attention", "mean", num_layers=3)
    rows = attention(LayerMaps(_maps()), settings, LAYOUT)
    np.testing.assert_allclose(rows, np.full((1, 8), 1 / 8), rtol=1e-12)


def test_gae_by_hand():
    """GAE's ``a = I + M`` with ``M = mean_heads(max(G * A, 0))``; with ``G = 1`` everywhere ``M``
    is the attention itself. Stage 1: [1/2, 1/2] @ (I + M) = [1, 1]; merge: 1/4 each; block 1:
    token 1 gets 1/4 + 4 x 1/4 = 5/4 (itself and the four queries of its window), token 3 the same,
    the others 1/4; block 0: ``q_j + 1/4 x (window mass)``, window masses 2 and 2, so + 1/2 each:
    tokens 1, 3 -> 7/4, others -> 3/4."""
    maps = _maps()
    ones = [np.ones_like(m) for m in maps]
    rows = gae(LayerMaps(maps, ones), resolve_settings("gae", num_layers=3), LAYOUT)
    np.testing.assert_allclose(rows[0] * 4, [3, 7, 3, 7, 3, 3, 3, 3], rtol=1e-12)


def test_discard_zeroes_the_lowest_in_window_entries_never_structural_zeros():
    """One stage, block 0 alone, distinct values 1..32 (/32): discard 0.5 of its K = 32 in-window
    entries zeroes exactly the 16 lowest, whatever the 32 structural zeros of the 8x8 ``M``
    (a discard over all 64 entries would zero 32, the structural zeros first, and keep all 32)."""
    layout = WindowedLayout(stage_grids=((2, 4),), blocks=(LAYOUT.blocks[0],))
    values = np.arange(1, 33, dtype=np.float32).reshape(1, 2, 1, 4, 4) / 32
    rows = rollout(LayerMaps([values]), resolve_settings("rollout", "mean", 0.5, num_layers=1), layout)
    kept = np.where(values[0, :, 0] > 16 / 32, values[0, :, 0].astype(np.float64), 0.0)  # [windows, 4, 4]
    assert np.count_nonzero(kept) == 16
    slots = slot_tokens((2, 4), (2, 2), (0, 0))
    dense = np.zeros((8, 8))
    for window in range(2):
        dense[np.ix_(slots[window], slots[window])] = kept[window]
    a = (dense + np.eye(8)) / 2
    a /= a.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(rows[0], np.full(8, 1 / 8) @ a, rtol=1e-12)
