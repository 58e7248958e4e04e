"""Relevance maps from attention: rollout, gradient rollout, GAE and raw attention, batched numpy.

Every method here needs only the class token's row of its token-to-token relevance matrix, so
that row is computed directly, as a vector times one ``N x N`` matrix per layer (last layer
first), never the ``N x N`` chain. Inputs are the graph's ``[L, B, heads, N, N]`` attentions
(and attention gradients for the class-specific methods); maths in float64.

``rollout`` (Abnar & Zuidema 2020) and ``grad_rollout`` (as in the original vit-explain), per
layer ``l``:

1. fuse the heads (mean, min or max) of ``A_l`` (rollout) or of ``A_l * G_l`` clamped at 0
   afterwards (gradient rollout);
2. zero the lowest ``int(N * N * discard_ratio)`` entries of the fused ``N x N`` map, except the
   class token's attention to itself (flat index 0) when it is among them;
3. ``a_l = (fused + I) / 2`` with each row divided by its own sum (the residual connection);
4. ``R = a_L @ ... @ a_1``; the mask is the class token's row of ``R`` over the patch tokens,
   computed as ``e_cls @ a_L @ ... @ a_1``.

``gae`` (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability"): ``R = I`` and,
for each layer in forward order, ``Abar_l = mean_heads(max(G_l * A_l, 0))`` (clamped per head,
then averaged) and ``R <- R + Abar_l @ R``. Unrolled, ``R = (I + Abar_L) ... (I + Abar_1)``, so
the class row is ``e_cls @ (I + Abar_L) @ ... @ (I + Abar_1)``: again last layer first, each step
``row <- row + row @ Abar_l``. No discard ratio, no row normalisation, no head-fusion choice.

``attention``: the last layer's attention, heads fused (mean by default), class row over the
patches. A baseline with no propagation through layers.

``start_layer = K`` (rollout, grad_rollout, gae) leaves out the first ``K`` layers: the chain
runs over layers ``K .. L-1`` only (Chefer et al.'s ``start_layer``).

For a model without a class token, the start vector is the mean of the patch tokens' rows
(documented in the README).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "HEAD_FUSIONS",
    "METHODS",
    "CLASS_SPECIFIC_METHODS",
    "fuse_heads",
    "discard_lowest",
    "Layers",
    "check_start_layer",
    "kth_smallest",
    "rollout_rows",
    "rollout_rows_from_fused",
    "rollout_masks",
    "gae_rows",
    "gae_rows_from_fused",
    "gae_masks",
    "attention_rows",
    "attention_masks",
    "rows_to_masks",
    "scale_to_unit_max",
]

HEAD_FUSIONS = ("mean", "min", "max")
METHODS = ("rollout", "grad_rollout", "gae", "attention")
#: Methods that explain one output (class) and so need the attention gradients.
CLASS_SPECIFIC_METHODS = ("grad_rollout", "gae")

_FUSERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x.mean(axis=1),
    "max": lambda x: x.max(axis=1),
    "min": lambda x: x.min(axis=1),
}


def fuse_heads(attention: np.ndarray, head_fusion: str) -> np.ndarray:
    """``[B, heads, N, N] -> [B, N, N]``."""
    try:
        return _FUSERS[head_fusion](attention)
    except KeyError:
        raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, not {head_fusion!r}") from None


#: A strided sample of about this many entries is sorted to bracket the wanted rank (numpy's
#: partition costs ~6 ns an entry and its sort ~10, a compare or a count ~0.1); see
#: :func:`_select_bracketed`.
_SAMPLE_SIZE = 512
#: Bisection stops when the bracket spans this many sample positions (about 300 entries of a
#: DeiT map): one more counting pass would cost more than gathering the entries it saves.
_BISECT_STOP = 4


def _select(values: np.ndarray, rank: int):
    """``np.partition(values, rank)[rank]`` for a 1-D array, ties at its minimum split off first.

    numpy's introselect slows down by an order of magnitude when many entries are equal, and the
    maps discarded here are often mostly exact zeros (after gradient rollout's clamp about half
    of a layer's entries, in the last layer nearly all of them): those sit at the minimum.
    """
    low = values.min()
    ties = np.count_nonzero(values == low)
    if rank < ties or low != low:  # a NaN minimum: every entry is NaN
        return low
    rest = np.compress(values > low, values)
    return np.partition(rest, rank - ties)[rank - ties]


def _bracket(size: int, index: int, n: int) -> tuple[int, int]:
    """Positions in a sorted strided sample of ``size`` of ``n`` entries between which the entry
    of rank ``index`` lies, but for a chance of about 1e-4: the sample's count below that entry
    is about binomial, so 4 standard deviations (and a few positions more) either side."""
    share = index / n
    centre = (index + 0.5) / n * size
    margin = 4.0 * math.sqrt(size * share * (1.0 - share)) + 4.0
    return int(centre - margin), int(math.ceil(centre + margin))


def _select_bracketed(values: np.ndarray, rank: int, sample_size: int = _SAMPLE_SIZE, stop: int = _BISECT_STOP):
    """``np.partition(values, rank)[rank]`` for a 1-D array (NaN sorted last), selecting among
    few entries.

    A strided sample is sorted; its values at positions either side of the wanted rank give a
    bracket ``[lo, hi]``, which two counts confirm (it holds unless the sample is very unlucky;
    otherwise the whole row is selected from, so the result is exact whatever the data). The
    bracket is then bisected over the sample's own values, one count per step, down to a few
    sample positions, and only the few hundred entries left are gathered and selected from.
    Why counts rather than gathering at once: a count is a branch-free pass (~7 us a DeiT map),
    while gathering the several percent of entries a first bracket holds stalls on every
    unpredictable branch (~55 us); gathering a fraction of a percent costs a few us.
    """
    n = values.size
    step = n // sample_size
    if step < 4:  # short: a sample would save little
        return _select_in_row(values, rank)
    sample = np.sort(values[::step])  # NaN sorts last
    size = sample.size
    if sample[-1] != sample[-1]:  # NaN in the sample: bisecting over it would compare with NaN
        return _select_in_row(values, rank)
    lo_at, hi_at = _bracket(size, rank, n)
    lo_at, hi_at = max(lo_at, -1), min(hi_at, size)  # -1 and size: the infinite ends
    lo = sample[lo_at] if lo_at >= 0 else -np.inf
    hi = sample[hi_at] if hi_at < size else np.inf
    first = np.count_nonzero(values < lo)  # rank of the first entry >= lo
    if not first <= rank < np.count_nonzero(values <= hi):  # (NaN is in neither count)
        return _select_in_row(values, rank)
    while hi_at - lo_at > stop:  # invariant: lo <= wanted <= hi, first = count(values < lo)
        mid = (lo_at + hi_at) // 2
        below = np.count_nonzero(values < sample[mid])
        if below <= rank:
            lo_at, lo, first = mid, sample[mid], below
        else:
            hi_at, hi = mid, sample[mid]
    if lo == hi:  # every entry in the bracket is equal (runs of zeros)
        return lo
    # lo <= x <= hi in one pass over the two masks; np.compress: boolean indexing, a third faster.
    inside = np.compress(np.greater(values <= hi, values < lo), values)
    return _select_in_row(inside, rank - first)


def kth_smallest(flat: np.ndarray, index: int) -> np.ndarray:
    """Per row of ``flat`` ``[B, n]``, the value at sorted position ``index``: ``[B, 1]``.

    The same values as ``np.partition(flat, index, axis=1)[:, index:index + 1]`` (NaN sorted
    last), about four times as fast on attention maps (:func:`_select_bracketed`). A full
    partition of every row was most of the rollout maths: it moves all ``n`` entries several
    times to find one value.
    """
    result = np.empty((flat.shape[0], 1), dtype=flat.dtype)
    for item, row in enumerate(flat):
        result[item, 0] = _select_bracketed(row, index)
    return result


def _select_in_row(row: np.ndarray, index: int):
    """A whole row's value at sorted position ``index`` (NaN last, as ``np.partition``)."""
    return np.partition(row, index)[index] if np.isnan(row).any() else _select(row, index)


def discard_lowest(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Zero, per image, the lowest ``int(N*N*discard_ratio)`` entries, sparing flat index 0. In place.

    As the original tool: the lowest ``count`` entries are chosen first, and the class token's
    attention to itself is then left alone if it is among them. The cut (the ``count``-th
    smallest value, :func:`kth_smallest`) is applied with a comparison, which is a few
    times faster than gathering and scattering ``count`` indices. In a row where several entries
    tie at the cut (common in photos: patches of flat sky or wall have identical keys, hence
    identical attention), as many of the tied entries as the count needs are dropped, the first
    ones in row order; which of equal entries go is arbitrary (torch's ``topk`` picks its own).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), not {discard_ratio}")
    batch = fused.shape[0]
    flat = fused.reshape(batch, -1)
    count = int(flat.shape[1] * discard_ratio)
    if count == 0:
        return fused
    cut = kth_smallest(flat, count - 1)
    keep = flat > cut
    # Rows where several entries tie at the cut. A cut of 0 (common after gradient rollout's
    # clamp) needs no tie-break: the maps are non-negative, so "> 0" keeps exactly what zeroing
    # the lowest ``count`` would, the other zeros staying zero either way.
    kept = np.array([np.count_nonzero(row) for row in keep])  # row by row: see kth_smallest
    tied = np.flatnonzero((kept != flat.shape[1] - count) & (cut[:, 0] != 0))
    for item in tied:  # several entries equal to the cut: drop exactly ``count`` of them
        row, value = flat[item], cut[item, 0]
        if value != value:  # a NaN cut: fewer numbers than entries to drop (NaN sorts last)
            keep[item] = True
            keep[item, np.argpartition(row, count - 1)[:count]] = False
            continue
        np.logical_not(row < value, out=keep[item])  # keeps the ties, and NaN (sorted last)
        below = flat.shape[1] - np.count_nonzero(keep[item])
        keep[item, np.flatnonzero(row == value)[: count - below]] = False
    keep[:, 0] = True  # never the class token's own attention
    np.multiply(flat, keep, out=flat)  # a multiply by 0/1 is much faster than a masked store
    return fused


def _fused_discarded(attention: np.ndarray, head_fusion: str, discard_ratio: float) -> np.ndarray:
    """Heads fused and the lowest entries discarded, in float64.

    max/min pick float32 values exactly, so they are fused and discarded in float32 (the same
    entries, a faster partition) before the conversion; the mean is accumulated in float64.
    """
    if head_fusion == "mean":
        return discard_lowest(attention.mean(axis=1, dtype=np.float64), discard_ratio)
    return discard_lowest(fuse_heads(attention, head_fusion), discard_ratio).astype(np.float64)


def _weighted_head_mean(attention: np.ndarray, gradient: np.ndarray, clamp_heads: bool) -> np.ndarray:
    """``mean over heads of A * G`` (each head's product clamped at 0 first if ``clamp_heads``),
    ``[B, heads, N, N]`` float32 -> ``[B, N, N]`` float64.

    The products of two float32 are exact in float64, so this is ``np.multiply(A, G,
    dtype=float64).mean(axis=1)`` up to the order of the sum over the heads. Both maps are
    converted whole (numpy's mixed-type multiply runs through a slow buffered casting loop) and
    then multiplied and summed over the heads in one ``einsum`` pass, or, with the clamp, in place
    and then summed. 12 layers of 4 images fresh from the graph: 8.9 ms one head at a time, 7.3 ms
    with one conversion and a mixed multiply, 6.1 ms like this.
    """
    heads = attention.shape[1]
    product = attention.astype(np.float64)
    if clamp_heads:
        np.multiply(product, gradient, out=product)
        np.maximum(product, 0.0, out=product)
        total = product.sum(axis=1)
    else:
        total = np.einsum("bhij,bhij->bij", product, gradient.astype(np.float64))
    total /= heads
    return total


def check_start_layer(start_layer: int, num_layers: int) -> int:
    """``start_layer`` as an int in ``[0, num_layers)``, or a ValueError saying what is allowed."""
    if isinstance(start_layer, bool) or not isinstance(start_layer, (int, np.integer)):
        raise ValueError(f"start layer must be an integer, not {start_layer!r}")
    if not 0 <= int(start_layer) < num_layers:
        raise ValueError(
            f"start layer must be in 0..{num_layers - 1} (the model has {num_layers} layers), not {start_layer}"
        )
    return int(start_layer)


def _start_rows(batch: int, tokens: int, num_prefix_tokens: int, has_class_token: bool) -> np.ndarray:
    rows = np.zeros((batch, 1, tokens), dtype=np.float64)
    if has_class_token:
        rows[:, 0, 0] = 1.0
    else:
        rows[:, 0, num_prefix_tokens:] = 1.0 / (tokens - num_prefix_tokens)
    return rows


#: Per-layer maps: ``[L, B, heads, N, N]``, or a sequence of ``L`` arrays ``[B, heads, N, N]``
#: (what :meth:`~vit_explain.runtime.session.ModelSession.run_layers` returns, unstacked).
Layers = np.ndarray | Sequence[np.ndarray]


def _layers_shape(attentions: Layers, gradients: Layers | None) -> tuple[int, int, int]:
    """``(layers, batch, tokens)`` after checking every layer (and gradient) has one shape."""
    shapes = {np.shape(layer) for layer in attentions}
    if len(attentions) == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 4:
        found = np.shape(attentions) if isinstance(attentions, np.ndarray) else sorted(shapes)
        raise ValueError(f"attentions must be [layers, batch, heads, tokens, tokens], got shape {found}")
    (shape,) = shapes
    if gradients is not None and (len(gradients) != len(attentions) or {np.shape(g) for g in gradients} != shapes):
        found = np.shape(gradients) if isinstance(gradients, np.ndarray) else [np.shape(g) for g in gradients]
        raise ValueError(f"gradients {found} do not match attentions {(len(attentions), *shape)}")
    return len(attentions), shape[0], shape[2]


def _layer_range(layers: int, start_layer: int) -> range:
    """Layers in the order the class row meets them: the last first, down to ``start_layer``."""
    return range(layers - 1, check_start_layer(start_layer, layers) - 1, -1)


def _rollout_step(row: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """``row @ a`` for ``a = D^-1 (F + I)``, D the row sums of ``F + I`` (the 1/2 of ``(F + I) / 2``
    cancels), as ``(row / d) @ F + row / d``: the identity and the division never touch N x N values."""
    scaled = row / (fused.sum(axis=-1) + 1.0)[:, None, :]
    return scaled @ fused + scaled


def rollout_rows(
    attentions: Layers,
    gradients: Layers | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
) -> np.ndarray:
    """The rolled-out relevance of each patch token, ``[B, num_patches]`` (unscaled, float64).

    ``attentions`` (and ``gradients`` for gradient rollout) are ``[L, B, heads, N, N]``.
    """
    layers, batch, tokens = _layers_shape(attentions, gradients)
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token)
    for layer in _layer_range(layers, start_layer):
        if gradients is None:
            fused = _fused_discarded(attentions[layer], head_fusion, discard_ratio)
        else:
            if head_fusion == "mean":
                fused = _weighted_head_mean(attentions[layer], gradients[layer], clamp_heads=False)
            else:
                fused = fuse_heads(np.multiply(attentions[layer], gradients[layer], dtype=np.float64), head_fusion)
            fused = discard_lowest(np.maximum(fused, 0.0, out=fused), discard_ratio)
        row = _rollout_step(row, fused)
    return row[:, 0, num_prefix_tokens:]


def rollout_rows_from_fused(
    fused_maps: np.ndarray,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
) -> np.ndarray:
    """:func:`rollout_rows` from maps already fused by the graph (:mod:`.graph_variants`):
    ``[L, B, N, N]``, the heads fused (and for gradient rollout weighted and clamped). Float32
    maps (max/min fusion) are discarded in float32, as :func:`rollout_rows` does; the input is
    not modified."""
    layers, batch, tokens, _ = fused_maps.shape
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token)
    for layer in _layer_range(layers, start_layer):
        fused = discard_lowest(fused_maps[layer].copy(), discard_ratio).astype(np.float64, copy=False)
        row = _rollout_step(row, fused)
    return row[:, 0, num_prefix_tokens:]


def gae_rows(
    attentions: Layers,
    gradients: Layers,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
) -> np.ndarray:
    """Generic Attention Explainability (Chefer et al. 2021): ``[B, num_patches]``, unscaled float64.

    ``R = (I + Abar_L) ... (I + Abar_K)`` with ``Abar_l = mean_heads(max(G_l * A_l, 0))``;
    returns the start row (class token) of ``R`` over the patch tokens.
    """
    if gradients is None:
        raise ValueError("gae needs the attention gradients")
    layers, batch, tokens = _layers_shape(attentions, gradients)
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token)
    # Forward recurrence R_l = R_{l-1} + Abar_l R_{l-1} = (I + Abar_l) R_{l-1}, so the first
    # factor applied to the row vector is the last layer's.
    for layer in _layer_range(layers, start_layer):
        row = row + row @ _weighted_head_mean(attentions[layer], gradients[layer], clamp_heads=True)
    return row[:, 0, num_prefix_tokens:]


def gae_rows_from_fused(
    fused_maps: np.ndarray, num_prefix_tokens: int, has_class_token: bool = True, start_layer: int = 0
) -> np.ndarray:
    """:func:`gae_rows` from ``Abar_l`` already computed by the graph: ``[L, B, N, N]`` float64."""
    layers, batch, tokens, _ = fused_maps.shape
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token)
    for layer in _layer_range(layers, start_layer):
        row = row + row @ fused_maps[layer]
    return row[:, 0, num_prefix_tokens:]


def attention_rows(
    attentions: Layers,
    head_fusion: str,
    num_prefix_tokens: int,
    has_class_token: bool = True,
) -> np.ndarray:
    """The last layer's attention from the class token to each patch, heads fused: ``[B, num_patches]``."""
    _, batch, tokens = _layers_shape(attentions, None)
    fused = fuse_heads(attentions[-1].astype(np.float64), head_fusion)
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token) @ fused
    return row[:, 0, num_prefix_tokens:]


def scale_to_unit_max(rows: np.ndarray) -> np.ndarray:
    """Scale each row to max 1 (an all-zero row stays zero, never NaN)."""
    peak = rows.max(axis=-1, keepdims=True)
    return np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)


def rows_to_masks(rows: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """``[B, num_patches]`` relevance -> masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    grid_h, grid_w = grid_size
    if rows.shape[1] != grid_h * grid_w:
        raise ValueError(f"{rows.shape[1]} patch tokens do not fill a {grid_h}x{grid_w} grid")
    return scale_to_unit_max(rows).astype(np.float32).reshape(rows.shape[0], grid_h, grid_w)


def rollout_masks(
    attentions: Layers,
    gradients: Layers | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
    start_layer: int = 0,
) -> np.ndarray:
    """Masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    rows = rollout_rows(
        attentions, gradients, head_fusion, discard_ratio, num_prefix_tokens, has_class_token, start_layer
    )
    return rows_to_masks(rows, grid_size)


def gae_masks(
    attentions: Layers,
    gradients: Layers,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
    start_layer: int = 0,
) -> np.ndarray:
    """GAE masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    return rows_to_masks(gae_rows(attentions, gradients, num_prefix_tokens, has_class_token, start_layer), grid_size)


def attention_masks(
    attentions: Layers,
    head_fusion: str,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
) -> np.ndarray:
    """Last-layer attention masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    return rows_to_masks(attention_rows(attentions, head_fusion, num_prefix_tokens, has_class_token), grid_size)
