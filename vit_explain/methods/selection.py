"""Choosing which entries of a fused attention map to discard: exact rank selection, fast.

Why its own module: the discard step of (gradient) rollout zeroes each map's lowest
``int(N * N * ratio)`` entries, and finding the cut was most of the rollout maths once. The
selection below returns exactly ``np.partition``'s value (so masks are unchanged to the bit) at a
fraction of its cost, by counting rather than moving entries.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["kth_smallest", "discard_lowest"]

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


def discard_lowest(fused: np.ndarray, discard_ratio: float, spare_first: bool = True) -> np.ndarray:
    """Zero, per image, the lowest ``int(N*N*discard_ratio)`` entries, sparing flat index 0. In place.

    ``spare_first=False``: nothing is spared (a windowed model's candidates, which have no class
    token, :mod:`.windowed`).

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
    if spare_first:
        keep[:, 0] = True  # never the class token's own attention
    np.multiply(flat, keep, out=flat)  # a multiply by 0/1 is much faster than a masked store
    return fused
