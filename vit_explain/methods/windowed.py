"""The relevance chain through shifted windows and patch merging (Swin), rows only.

The definition (the README states it): per block, the heads of the window attention are fused
(rollout: ``mean|min|max`` of ``A``; gradient rollout: of ``A * dScore/dA``, clamped at 0 after
fusion; GAE: ``mean_heads(max(G * A, 0))``), and the fused windows are placed into a token-level
map ``M`` (``N_s x N_s``) with the block's cyclic shift undone: ``M[i, j]`` is the fused attention
of original token ``i`` to original token ``j`` when both fell in one window, else 0; padded tokens
are dropped. Rollout discards the lowest ``int(K * ratio)`` of the ``K`` in-window entries (not the
structural zeros), then ``a = (M + I) / 2`` with rows normalised; GAE uses ``a = I + M``. Patch
merging passes a merged token's relevance to each of its four source tokens with weight 1/4
(``P``, ``N_{s+1} x N_s``). The mask is ``seed . a_L ... P ... a_1``, the seed the uniform row
over the last stage's tokens (the head averages them).

Why no ``N x N`` anywhere: stage 1 of Swin-T at 224 px has 3,136 tokens. ``M`` is never built.
Each block's map acts on the row through the windows: the row is gathered into window slots
(the shifted, padded order), multiplied by each window's ``w*w x w*w`` block, and scattered
back to token order, ``O(N * w*w)`` a block. The index maps (slot -> original token) are derived
from the layout once per block shape and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np

from ..windowing import WindowedLayout
from .chain import LayerMaps, layer_order
from .fusion import fuse_heads
from .selection import discard_lowest
from .settings import Settings

__all__ = [
    "slot_tokens",
    "discard_candidates",
    "unpack",
    "fuse_windows",
    "windowed_rows",
    "rollout",
    "grad_rollout",
    "gae",
    "attention",
]

#: One block's map applied to rows from the right: ``[B, N_s] -> [B, N_s]``.
RowStep = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=64)
def slot_tokens(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], pad_before_shift: bool = False
) -> np.ndarray:
    """``[windows, w*w]`` int64: the original token (row-major index in ``grid``) at each window
    slot of a block, ``N`` (one past the last token) for a padded slot.

    timm rolls the grid by ``-shift`` (``shifted[r] = x[(r + shift) % H]``), pads it at the bottom
    and right to whole windows, and partitions it into windows in row-major order; transformers
    (``pad_before_shift``) pads first and rolls the padded grid (``% H_padded``)."""
    (rows, columns), (wh, ww), (sh, sw) = grid, window, shift
    padded_rows, padded_columns = -(-rows // wh) * wh, -(-columns // ww) * ww
    r = np.arange(padded_rows)[:, None]
    c = np.arange(padded_columns)[None, :]
    if pad_before_shift:
        source_r, source_c = (r + sh) % padded_rows, (c + sw) % padded_columns
        real = (source_r < rows) & (source_c < columns)
    else:
        source_r, source_c = (r + sh) % rows, (c + sw) % columns
        real = (r < rows) & (c < columns)
    tokens = np.where(real, source_r * columns + source_c, rows * columns)
    windows = tokens.reshape(padded_rows // wh, wh, padded_columns // ww, ww).transpose(0, 2, 1, 3)
    result = np.ascontiguousarray(windows.reshape(-1, wh * ww))
    result.setflags(write=False)
    return result


@lru_cache(maxsize=64)
def discard_candidates(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], pad_before_shift: bool = False
) -> np.ndarray:
    """Flat positions (in one image's ``[windows, w*w, w*w]`` fused map) of the ``K`` in-window
    entries of ``M`` (both tokens real), ordered as ``M`` is read row by row: ``i * N + j``. The
    discard's tie-break ("the first ones in row order") is then the ViT path's."""
    slots = slot_tokens(grid, window, shift, pad_before_shift)
    tokens = grid[0] * grid[1]
    rows = np.broadcast_to(slots[:, :, None], (*slots.shape, slots.shape[1]))
    columns = np.broadcast_to(slots[:, None, :], rows.shape)
    real = ((rows < tokens) & (columns < tokens)).ravel()
    flat = np.flatnonzero(real)
    order = np.argsort((rows.ravel()[flat] * tokens + columns.ravel()[flat]), kind="stable")
    result = flat[order]
    result.setflags(write=False)
    return result


def unpack(packed: np.ndarray, layout: WindowedLayout) -> list[np.ndarray]:
    """The graph's packed ``[B, values]`` attention (or gradient) output -> per block
    ``[B, windows, heads, w*w, w*w]`` views (no copy)."""
    if packed.ndim != 2 or packed.shape[1] != layout.packed_values:
        raise ValueError(f"packed windowed maps must be [batch, {layout.packed_values}], got {packed.shape}")
    starts = layout.offsets()
    return [
        packed[:, starts[block]:starts[block + 1]].reshape(packed.shape[0], *layout.block_shape(block))
        for block in range(len(layout.blocks))
    ]


def fuse_windows(attention: np.ndarray, gradient: np.ndarray | None, method: str, head_fusion: str | None) -> np.ndarray:
    """One block's per-head windows ``[B, windows, heads, a, a]`` -> ``[B, windows, a, a]`` float64.

    Same dtype paths as the ViT maths (:mod:`.fusion`): max/min pick float32 values exactly, the
    mean and the products with the gradient are computed in float64."""
    if method == "gae":
        product = np.multiply(attention, gradient, dtype=np.float64)
        return np.maximum(product, 0.0, out=product).mean(axis=2)
    if gradient is not None:  # gradient rollout: fuse A * G, then clamp
        product = np.multiply(attention, gradient, dtype=np.float64)
        fused = product.mean(axis=2) if head_fusion == "mean" else fuse_heads(np.moveaxis(product, 2, 1), head_fusion)
        return np.maximum(fused, 0.0, out=fused)
    if head_fusion == "mean":
        return attention.mean(axis=2, dtype=np.float64)
    return fuse_heads(np.moveaxis(attention, 2, 1), head_fusion).astype(np.float64)


def _placed(fused: np.ndarray, slots: np.ndarray, tokens: int) -> np.ndarray:
    """The fused windows with padded rows and columns zeroed (padded tokens are dropped). In place."""
    real = slots < tokens
    fused *= (real[:, :, None] & real[:, None, :])
    return fused


def _discarded(fused: np.ndarray, candidates: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Zero the lowest ``int(K * ratio)`` of the ``K`` in-window entries per image, in ``M``'s
    row order (:func:`discard_candidates`); nothing is spared (there is no class token). In place."""
    if discard_ratio == 0.0:
        return fused
    flat = fused.reshape(fused.shape[0], -1)
    values = flat[:, candidates]
    discard_lowest(values, discard_ratio, spare_first=False)
    flat[:, candidates] = values
    return fused


def _window_step(fused: np.ndarray, slots: np.ndarray, tokens: int, kind: str) -> RowStep:
    """``row @ a`` through the windows: ``kind`` "rollout" (``a = D^-1 (M + I)``), "residual"
    (``a = I + M``) or "linear" (``a = M``)."""
    flat_slots = slots.ravel()

    def gather(values: np.ndarray) -> np.ndarray:  # [B, N] -> [B, windows, a], 0 at padded slots
        extended = np.concatenate([values, np.zeros((values.shape[0], 1))], axis=1)
        return extended[:, flat_slots].reshape(values.shape[0], *slots.shape)

    def scatter_add(base: np.ndarray, values: np.ndarray) -> np.ndarray:  # [B, windows, a] onto [B, N]
        extended = np.concatenate([base, np.zeros((base.shape[0], 1))], axis=1)
        extended[:, flat_slots] += values.reshape(base.shape[0], -1)  # each real token once
        return extended[:, :tokens]

    def step(row: np.ndarray) -> np.ndarray:
        if kind == "rollout":
            sums = np.zeros((row.shape[0], tokens + 1))
            sums[:, flat_slots] = fused.sum(axis=-1).reshape(row.shape[0], -1)
            row = row / (sums[:, :tokens] + 1.0)
        product = np.einsum("bwi,bwij->bwj", gather(row), fused)
        return scatter_add(np.zeros_like(row) if kind == "linear" else row, product)

    return step


def _merge_step(fine: tuple[int, int], coarse: tuple[int, int]) -> RowStep:
    """``row @ P``: each merged token's relevance to its four source tokens, 1/4 each (sources in
    timm's padding of an odd grid are dropped)."""

    def step(row: np.ndarray) -> np.ndarray:
        grid = row.reshape(row.shape[0], *coarse)
        spread = np.repeat(np.repeat(grid, 2, axis=1), 2, axis=2)[:, : fine[0], : fine[1]]
        return spread.reshape(row.shape[0], -1) / 4.0

    return step


def windowed_rows(
    layout: WindowedLayout,
    fused_blocks: Callable[[int], np.ndarray],
    order: Sequence[int],
    kind: str,
    batch: int,
    discard_ratio: float | None = None,
) -> np.ndarray:
    """``seed . a_L ... P ... a_K`` then merges down to the first stage: ``[B, N_0]`` float64.

    ``fused_blocks(block)`` gives a block's fused windows ``[B, windows, a, a]`` (float64, a fresh
    array this may change); ``order`` the blocks last first."""
    grids = layout.stage_grids
    stage = len(grids) - 1
    row = np.full((batch, grids[stage][0] * grids[stage][1]), 1.0 / (grids[stage][0] * grids[stage][1]))

    def steps() -> Iterator[RowStep]:
        nonlocal stage
        for block in order:
            spec = layout.blocks[block]
            while stage > spec.stage:
                yield _merge_step(grids[stage - 1], grids[stage])
                stage -= 1
            grid = grids[stage]
            tokens = grid[0] * grid[1]
            where = (grid, spec.window, spec.shift, layout.pad_before_shift)
            slots = slot_tokens(*where)
            fused = _placed(fused_blocks(block), slots, tokens)
            if discard_ratio:
                _discarded(fused, discard_candidates(*where), discard_ratio)
            yield _window_step(fused, slots, tokens, kind)
        while stage > 0:
            yield _merge_step(grids[stage - 1], grids[stage])
            stage -= 1

    for step in steps():
        row = step(row)
    return row


def _check(maps: LayerMaps, layout: WindowedLayout, gradients: bool) -> int:
    if maps.attentions is None or len(maps.attentions) != len(layout.blocks):
        raise ValueError(f"windowed maths needs the {len(layout.blocks)} blocks' raw window attentions")
    if gradients and (maps.gradients is None or len(maps.gradients) != len(layout.blocks)):
        raise ValueError("this method needs the attention gradients")
    return int(maps.attentions[0].shape[0])


# -- the registry's entry points for windowed layouts: (maps, settings, layout) -> rows [B, N_0] --
def rollout(maps: LayerMaps, settings: Settings, layout: WindowedLayout) -> np.ndarray:
    batch = _check(maps, layout, gradients=False)
    order = layer_order(len(layout.blocks), settings.start_layer)
    fuse = lambda block: fuse_windows(maps.attentions[block], None, "rollout", settings.head_fusion)  # noqa: E731
    return windowed_rows(layout, fuse, order, "rollout", batch, settings.discard_ratio)


def grad_rollout(maps: LayerMaps, settings: Settings, layout: WindowedLayout) -> np.ndarray:
    batch = _check(maps, layout, gradients=True)
    order = layer_order(len(layout.blocks), settings.start_layer)
    fuse = lambda block: fuse_windows(  # noqa: E731
        maps.attentions[block], maps.gradients[block], "grad_rollout", settings.head_fusion
    )
    return windowed_rows(layout, fuse, order, "rollout", batch, settings.discard_ratio)


def gae(maps: LayerMaps, settings: Settings, layout: WindowedLayout) -> np.ndarray:
    batch = _check(maps, layout, gradients=True)
    order = layer_order(len(layout.blocks), settings.start_layer)
    fuse = lambda block: fuse_windows(maps.attentions[block], maps.gradients[block], "gae", None)  # noqa: E731
    return windowed_rows(layout, fuse, order, "residual", batch)


def attention(maps: LayerMaps, settings: Settings, layout: WindowedLayout) -> np.ndarray:
    batch = _check(maps, layout, gradients=False)
    last = len(layout.blocks) - 1
    fuse = lambda block: fuse_windows(maps.attentions[block], None, "attention", settings.head_fusion)  # noqa: E731
    return windowed_rows(layout, fuse, [last], "linear", batch)
