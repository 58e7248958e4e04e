"""Turn a patch-grid mask into something a person can look at.

A rollout mask is tiny (one value per patch, e.g. 14x14); people need it at the
image's own size, in colour, laid over the photo. Colours come from matplotlib's
colormap registry so that "jet", "viridis", ... look exactly as users know them.
Only ``matplotlib.colormaps`` is used (imported lazily): pyplot is slow to import
and wants a GUI backend, neither of which a batch tool should pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

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

    Bilinear interpolation on a float ("F" mode) image keeps full precision and
    avoids the blocky look of nearest-neighbour patches; bilinear (not bicubic)
    means no ringing, and the result is clipped anyway. Returns float32
    ``[height, width]`` in [0, 1].
    """
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    grid = _as_mask(mask)
    resized = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    out = np.asarray(resized, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


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


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> Image.Image:
    """Blend the coloured mask over ``image``; RGB at the image's original size.

    ``alpha`` is the weight of the heatmap: 0 gives the photo back, 1 only the
    heatmap. The mask is stretched over the whole image: if preprocessing cropped
    the image, pass the cropped view so the patches line up with what the model saw.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = image if image.mode == "RGB" else image.convert("RGB")
    heat = colorize(upsample_mask(mask, base.size), colormap)
    return Image.blend(base, Image.fromarray(heat), float(alpha))
