"""How images are perturbed for the faithfulness metrics: baselines, rankings, schedules.

Everything works in the model's *normalised* input space (``[B, 3, H, W]`` float32, as the
Explainer's preprocessing produces it), in numpy only.

Baselines, i.e. what a removed pixel becomes:

* ``"mean"``: zero in normalised space, which is the normalisation's mean colour (a flat
  grey for ImageNet statistics). The default for deletion and for the perturbation tests: it
  carries no information about the image and is in-distribution for the normalisation.
* ``"black"``: RGB (0, 0, 0), i.e. ``-mean / std`` per channel (what Chefer et al. used).
* ``"blur"``: the image blurred by a Gaussian (sigma 5 px, 11 taps, reflected edges), as
  RISE's insertion metric does: the default start image for insertion, so revealing patches
  adds detail rather than arbitrary colour edges.

Ranking: units (patches or pixels) are sorted by relevance, most relevant first; ties (a flat
map, the inside of an upsampled patch) are broken by a seeded random key, so a constant map
behaves like a random one rather than like "top-left first".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vit_explain.outputs.placement import place_mask

__all__ = [
    "BASELINES",
    "BLUR_SIGMA",
    "BLUR_RADIUS",
    "baseline_images",
    "gaussian_blur",
    "upsample_bilinear",
    "patch_index_map",
    "rank_descending",
    "rank_map",
    "step_counts",
    "perturbation_counts",
]

BASELINES = ("mean", "black", "blur")
BLUR_SIGMA = 5.0
BLUR_RADIUS = 5  # 11 taps, as RISE's ``gkern(11, 5)``


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur_axis(images: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    radius = len(kernel) // 2
    size = images.shape[axis]
    # Reflect padding needs radius < size; clamp (edge) padding covers tiny images.
    mode = "reflect" if size > radius else "edge"
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(images, pad, mode=mode)
    out = np.zeros_like(images, dtype=np.float64)
    for offset, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(offset, offset + size), axis=axis)
    return out


def gaussian_blur(images: np.ndarray, sigma: float = BLUR_SIGMA, radius: int = BLUR_RADIUS) -> np.ndarray:
    """Separable Gaussian blur of ``[B, C, H, W]`` images (float32 out)."""
    kernel = _gaussian_kernel(sigma, radius)
    blurred = _blur_axis(images.astype(np.float64), kernel, axis=2)
    blurred = _blur_axis(blurred, kernel, axis=3)
    return blurred.astype(np.float32)


def baseline_images(
    pixels: np.ndarray,
    kind: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """The fully perturbed version of each image, ``[B, 3, H, W]`` float32 (see the module doc)."""
    if kind == "mean":
        return np.zeros_like(pixels, dtype=np.float32)
    if kind == "black":
        if mean is None or std is None:
            raise ValueError("the 'black' baseline needs the model's normalisation mean and std")
        value = -np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
        return np.broadcast_to(value.reshape(1, -1, 1, 1), pixels.shape).astype(np.float32)
    if kind == "blur":
        return gaussian_blur(pixels)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def upsample_bilinear(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Patch-grid maps ``[B, gh, gw]`` -> pixel maps ``[B, H, W]`` (float64), bilinear.

    Matches ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``,
    which Chefer et al. use to turn a patch map into pixel relevance. The pixels are the model
    input, which the grid covers whole, so this is the overlay's own mapping
    (:func:`~vit_explain.outputs.placement.place_mask`) with the window the whole input: a map
    is ranked here exactly as it is drawn.
    """
    return np.stack([place_mask(mask, (width, height)).heat for mask in masks])


def patch_index_map(grid_size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """``[H, W]`` int: the patch (row-major index in the grid) that each pixel belongs to."""
    grid_h, grid_w = grid_size
    ys = np.arange(height) * grid_h // height
    xs = np.arange(width) * grid_w // width
    return ys[:, None] * grid_w + xs[None, :]


def rank_descending(values: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
    """Per row, the position of each unit when sorted by value, largest first (0 = most relevant).

    ``values`` and ``tie_break`` are ``[B, U]``; equal values are ordered by ``tie_break``.
    """
    order = np.lexsort((tie_break, -values), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[-1])[None, :].repeat(values.shape[0], 0), axis=-1)
    return ranks


def rank_map(unit_ranks: np.ndarray, unit_of_pixel: np.ndarray | None) -> np.ndarray:
    """Per-pixel rank ``[H, W]`` from per-unit ranks ``[U]`` (``unit_of_pixel`` None: units are pixels)."""
    if unit_of_pixel is None:
        return unit_ranks
    return unit_ranks[unit_of_pixel]


def step_counts(units: int, steps: int) -> np.ndarray:
    """Deletion / insertion schedule: ``round(k * units / steps)`` units for ``k = 0..steps``.

    Repeated counts (more steps than units) are dropped, so the curve always starts at 0
    and ends at ``units``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    counts = np.rint(np.arange(steps + 1) * units / steps).astype(np.int64)
    return np.unique(counts)


def perturbation_counts(units: int, levels: int = 10) -> np.ndarray:
    """Positive / negative perturbation schedule: ``floor(units * k / levels)`` for ``k = 0..levels-1``
    (0%, 10%, .., 90% with the default 10 levels, as Chefer et al.)."""
    return np.array([units * k // levels for k in range(levels)], dtype=np.int64)
