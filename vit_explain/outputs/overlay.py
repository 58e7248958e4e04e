"""Turn a patch-grid mask into something a person can look at.

A rollout mask is tiny (one value per patch, e.g. 14x14); people need it at the
image's own size, in colour, laid over the photo, exactly where the model looked:
:mod:`vit_explain.outputs.placement` maps the mask through the inverse of the
preprocessing, and what the model did not see (the parts the centre crop cut off) is
drawn dimmed, grey and hatched behind a thin white frame, never in the colormap's colours,
so nobody reads an explanation into pixels that were never explained. Colours come from matplotlib's
colormap registry so that "jet", "viridis", ... look exactly as users know them.
Only ``matplotlib.colormaps`` is used (imported lazily): pyplot is slow to import
and wants a GUI backend, neither of which a batch tool should pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .placement import Box, Placement, place_mask

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.colors import Colormap

__all__ = ["upsample_mask", "colorize", "overlay", "available_colormaps"]


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """Validate a mask and return it as finite float32 in [0, 1].

    Rollout can in principle produce NaN (e.g. a degenerate model); painting NaN
    gives undefined colours, so non-finite values become 0 ("no attention").
    """
    arr = np.asarray(mask, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D [grid_h, grid_w], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"mask is empty (shape {arr.shape})")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a patch-grid mask to ``size`` = (width, height), smoothly.

    The mask is stretched over the whole of ``size``: right for the model's own input, wrong
    for a photo the preprocessing cropped (use :func:`overlay` with a ``box`` for those). It is
    :func:`~vit_explain.outputs.placement.place_mask` with the grid covering everything, so it
    interpolates exactly as the overlay and ``evaluate`` do: bilinear (smooth, no ringing) with
    half-pixel centres. Returns float32 ``[height, width]`` in [0, 1].
    """
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    heat = place_mask(_as_mask(mask), (width, height)).heat
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def _registry():  # -> matplotlib.cm.ColormapRegistry
    """Import matplotlib's colormap registry only when colours are needed."""
    import matplotlib

    return matplotlib.colormaps


def available_colormaps() -> list[str]:
    """Names accepted by :func:`colorize`, sorted (for ``--help`` and errors)."""
    return sorted(_registry())


def _get_colormap(name: str) -> Colormap:
    """Look ``name`` up in the registry; unknown names get a helpful ValueError."""
    registry = _registry()
    try:
        return registry[name]
    except KeyError:
        popular = [n for n in ("jet", "viridis", "inferno", "magma", "turbo", "hot") if n in registry]
        raise ValueError(
            f"unknown colormap {name!r}; try one of {', '.join(popular)} "
            f"({len(registry)} available, see available_colormaps())"
        ) from None


def colorize(mask: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Map mask values in [0, 1] to RGB colours: ``uint8 [H, W, 3]``."""
    cmap = _get_colormap(colormap)
    rgba = cmap(_as_mask(mask), bytes=True)
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


#: How much of its brightness an unseen pixel keeps, and how much a hatch line adds.
_UNSEEN_DIM, _HATCH_LIFT = 0.4, 60.0


def _line_width(size: tuple[int, int]) -> int:
    """Frame and hatch thickness: 1 px at 224 px, growing with the photo so it stays visible."""
    return max(1, round(min(size) / 224))


def _unseen(base: Image.Image) -> np.ndarray:
    """The photo as the unseen region shows it: grey, dimmed and hatched (``uint8 [H, W, 3]``).

    Grey (R = G = B) so no colormap colour can appear there; hatched so a dark photo's unseen
    border is still told apart from a dark, unexplained part of the seen window.
    """
    grey = np.asarray(base.convert("L"), dtype=np.float32) * _UNSEEN_DIM
    line = _line_width(base.size)
    ys, xs = np.ogrid[: base.height, : base.width]
    grey = np.where((xs + ys) % (8 * line) < line, grey + _HATCH_LIFT, grey)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _draw_frame(pixels: np.ndarray, window: tuple[int, int, int, int], line: int) -> None:
    """A white frame of ``line`` px just outside the seen window (clipped to the image), in place."""
    x0, y0, x1, y1 = window
    height, width = pixels.shape[:2]
    outer_x0, outer_y0 = max(0, x0 - line), max(0, y0 - line)
    outer_x1, outer_y1 = min(width, x1 + line), min(height, y1 + line)
    pixels[outer_y0:y0, outer_x0:outer_x1] = 255
    pixels[y1:outer_y1, outer_x0:outer_x1] = 255
    pixels[outer_y0:outer_y1, outer_x0:x0] = 255
    pixels[outer_y0:outer_y1, x1:outer_x1] = 255


def _blend_window(base: Image.Image, placement: Placement, colormap: str, alpha: float) -> Image.Image:
    """The seen window of ``base`` with the heat map blended over it."""
    x0, y0, x1, y1 = placement.window
    heat = colorize(np.clip(placement.heat[y0:y1, x0:x1], 0.0, 1.0).astype(np.float32), colormap)
    return Image.blend(base.crop(placement.window), Image.fromarray(heat), alpha)


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    colormap: str = "jet",
    alpha: float = 0.5,
    box: Box | None = None,
) -> Image.Image:
    """Blend the coloured mask over ``image`` where the model looked; RGB at the image's size.

    ``alpha`` is the weight of the heatmap: 0 gives the photo back, 1 only the heatmap.
    ``box`` is where the patch grid lies on ``image`` (:func:`~vit_explain.outputs.placement.
    model_box` for a photo the model's preprocessing resized and cropped); ``None`` means the
    image is exactly what the grid covers. Pixels outside the box are drawn grey, dimmed and
    hatched, with a thin white frame around the seen window.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = image if image.mode == "RGB" else image.convert("RGB")
    placement = place_mask(_as_mask(mask), base.size, box)
    x0, y0, x1, y1 = placement.window
    if placement.covers_image:
        return _blend_window(base, placement, colormap, float(alpha))
    pixels = _unseen(base)
    if x1 > x0 and y1 > y0:
        pixels[y0:y1, x0:x1] = np.asarray(_blend_window(base, placement, colormap, float(alpha)))
    _draw_frame(pixels, placement.window, _line_width(base.size))
    return Image.fromarray(pixels)
