"""Comparing masks computed from slightly different tensors (ONNX vs eager, fused vs raw).

Plain functions, not fixtures, so tests can import them; ``tests/conftest.py`` also offers
:func:`mask_comparison` as the ``compare_masks`` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Relative (to the mask's max, 1) difference allowed between masks whose inputs differ only by
#: float noise. The graph matches eager PyTorch to ~2e-6 relative (attentions); rollout rows
#: (probability mass, <= 1) then agree to ~2e-6 relative to their peak, measured on every family.
MASK_TOLERANCE = 1e-5
#: Absolute noise floor on unscaled rollout rows. Where little relevance reaches the patches (peak
#: below ~1e-3, as with min-fused gradient rollout, whose entries are clamped near-cancellations of
#: A * G) the rows carry float32 noise of the *gradients'* scale: measured <= 4e-9. Scaling to max 1
#: divides that by the peak (and moves the peak by as much): ``2 * ROW_NOISE / peak`` on the mask.
ROW_NOISE = 1e-8


def fused_maps(attentions: np.ndarray, gradients: np.ndarray | None, head_fusion: str) -> np.ndarray:
    """Each layer's fused map before the discard step, ``[L, B, N * N]`` float64 (the rollout's step 1)."""
    from vit_explain.methods.fusion import fuse_heads

    fused = []
    for layer, attention in enumerate(attentions.astype(np.float64)):
        if gradients is None:
            fused.append(fuse_heads(attention, head_fusion))
        else:
            fused.append(np.maximum(fuse_heads(attention * gradients[layer], head_fusion), 0.0))
    return np.stack(fused).reshape(len(fused), attentions.shape[1], -1)


def _lowest(values: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks: the ``count`` lowest entries (stable order), and the entries tied at the
    boundary when the boundary is an exact tie (whichever of those a discard picks is arbitrary)."""
    order = np.argsort(values, kind="stable")
    lowest = np.zeros(values.shape, dtype=bool)
    lowest[order[:count]] = True
    lo, hi = values[order[count - 1]], values[order[count]]
    tied = values == lo if lo == hi else np.zeros(values.shape, dtype=bool)
    return lowest, tied


def discard_disagreement(fused_a: np.ndarray, fused_b: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Per image, the total value of the entries that the discard step may zero on one side and
    keep on the other, summed over layers (``fused_*``: ``[L, B, N*N]``). Zero when both sides
    certainly discard the same entries.

    Counted: entries among the ``k`` lowest of ``a`` but not of ``b`` or the reverse, and entries
    in an exact tie at either boundary (numpy's argpartition and torch's topk break ties
    differently). Flat index 0 is never counted: it is spared either way. An entry zeroed on only
    one side changes that side's map by its own value, at most ``max(a, b)`` there.
    """
    layers, batch, size = fused_b.shape
    count = int(size * discard_ratio)
    mass = np.zeros(batch)
    if count == 0:
        return mass
    for layer in range(layers):
        for item in range(batch):
            a, b = fused_a[layer, item], fused_b[layer, item]
            lowest_a, tied_a = _lowest(a, count)
            lowest_b, tied_b = _lowest(b, count)
            differ = (lowest_a != lowest_b) | tied_a | tied_b
            differ[0] = False
            mass[item] += float(np.maximum(a, b)[differ].sum())
    return mass


@dataclass(frozen=True)
class MaskComparison:
    """Per image: the allowed mask difference and whether it is the plain float-noise bound."""

    tolerance: np.ndarray
    tight: np.ndarray  # both sides discarded exactly the same entries
    peak: np.ndarray  # the unscaled rollout row's max on side b


def mask_comparison(
    attentions_a: np.ndarray,
    gradients_a: np.ndarray | None,
    attentions_b: np.ndarray,
    gradients_b: np.ndarray | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool,
    seed_weights: tuple[float, ...] | None = None,
) -> MaskComparison:
    """How much the scaled rollout masks of tensors ``a`` and ``b`` may justifiably differ.

    * Float noise: ``MASK_TOLERANCE + 2 * ROW_NOISE / peak`` (see those constants).
    * Discard swaps, when a ~1e-7 difference moves an entry across the discard boundary: changing
      a fused map by ``D`` (L1 norm ``d``) changes its normalised rows ``(F + I) / rowsum`` by at
      most ``2 d`` in L1 (every row sum is >= 1), hence the rolled-out row vector (a probability
      vector) by at most ``2 d``; the other layers are row-stochastic and never increase an L1
      difference. With ``d`` summed over layers (:func:`discard_disagreement`), the unscaled rows
      differ by at most ``2 d`` more, and after dividing by the peak ``p`` (itself moved by at most
      as much) the masks by at most ``4 d / (p - 2 d)``.
    """
    from vit_explain.methods.relevance import rollout_rows

    mass = discard_disagreement(
        fused_maps(attentions_a, gradients_a, head_fusion),
        fused_maps(attentions_b, gradients_b, head_fusion),
        discard_ratio,
    )
    layout = (discard_ratio, num_prefix_tokens, has_class_token, 0, seed_weights)
    peak_a = rollout_rows(attentions_a, gradients_a, head_fusion, *layout).max(axis=-1)
    peak = rollout_rows(attentions_b, gradients_b, head_fusion, *layout).max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        noise = MASK_TOLERANCE + 2 * ROW_NOISE / peak
        swaps = np.where(mass > 0, 4 * mass / np.maximum(peak - 2 * mass, 0.0), 0.0)
    tolerance = noise + swaps
    # Nothing reaches the patches on side b (all-zero mask): side a may only have noise there,
    # which its scaling blows up to 1, so its mask cannot be compared; a real peak must not exist.
    nothing = peak == 0
    only_noise = nothing & (peak_a > 0) & (peak_a <= ROW_NOISE)
    tolerance[nothing] = MASK_TOLERANCE
    tolerance[only_noise] = np.inf
    return MaskComparison(tolerance, (mass == 0) & ~nothing, peak)
