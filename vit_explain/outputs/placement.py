"""Where a patch-grid mask lies on an image: the one place that maps masks to pixels.

The model never sees the user's photo as it is: timm's eval transform resizes it, centre-crops
(or pads) it, and the patch embedding then drops the input pixels right of / below the last
whole patch. A mask stretched over the whole photo therefore paints regions the model never saw
(a 672x224 panorama gets its middle third's mask smeared three times as wide). This module
inverts that chain exactly, from :class:`~vit_explain.runtime.preprocess.Geometry` (the same
numbers the preprocessing used, rounding included), so the overlay, the report, the contact
sheet and ``evaluate`` all place masks the same way.

Pure numpy, no torch: the runtime and the outputs share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vit_explain.metadata import ModelMetadata
from vit_explain.runtime.preprocess import Geometry, resize_geometry

__all__ = ["Box", "Placement", "grid_box", "model_box", "place_mask"]

#: ``(left, top, right, bottom)``; right and bottom are exclusive (pixel edges, not centres).
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Placement:
    """A mask placed on an image's pixel grid.

    ``heat``: float64 ``[height, width]``, the mask's bilinear value at each pixel centre inside
    ``window`` and 0 outside it (the model saw nothing there, so nothing there is explained).
    ``window``: the seen pixels as integer ``(left, top, right, bottom)``, clipped to the image.
    ``box``: the exact area the mask covers, in continuous image coordinates and *not* clipped
    (it runs past the image where preprocessing padded), for tools that place the mask themselves.
    """

    heat: np.ndarray
    window: tuple[int, int, int, int]
    box: Box

    @property
    def covers_image(self) -> bool:
        """Whether the model saw the whole image (nothing to mark as unseen)."""
        height, width = self.heat.shape
        return self.window == (0, 0, width, height)


def grid_box(geometry: Geometry, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> Box:
    """The patch grid's area in original-image coordinates (continuous, unclipped).

    The grid covers ``grid * patch`` input pixels from the input's top-left corner: less than
    the input when its size is not a multiple of the patch (the patch embedding drops the rest).
    Input pixel edge ``u`` is resized-image edge ``u + crop_left``, which Pillow's resize maps to
    original edge ``(u + crop_left) * width / resized_width``.
    """
    (width, height), (resized_w, resized_h) = geometry.original_size, geometry.resized_size
    scale_x, scale_y = width / resized_w, height / resized_h
    covered_w, covered_h = grid_size[1] * patch_size[1], grid_size[0] * patch_size[0]
    left, top = geometry.crop_left * scale_x, geometry.crop_top * scale_y
    return (left, top, (geometry.crop_left + covered_w) * scale_x, (geometry.crop_top + covered_h) * scale_y)


def model_box(size: tuple[int, int], metadata: ModelMetadata) -> Box:
    """Where ``metadata``'s patch grid lies on an upright ``size = (width, height)`` photo.

    The photo must be the one the model was given, after EXIF orientation (as
    :func:`~vit_explain.runtime.images.load_image` returns it): the geometry is that image's.
    """
    geometry = resize_geometry(int(size[0]), int(size[1]), metadata.preprocess)
    return grid_box(geometry, metadata.grid_size, metadata.patch_size)


def _seen_span(low: float, high: float, size: int) -> tuple[int, int]:
    """Pixels whose centre ``i + 0.5`` lies in ``[low, high)``, clipped to ``[0, size)``."""
    first = max(0, math.ceil(low - 0.5))
    stop = min(size, math.ceil(high - 0.5))
    return first, max(first, stop)


def _axis_weights(pixels: np.ndarray, low: float, high: float, cells: int) -> np.ndarray:
    """``[len(pixels), cells]`` bilinear weights of pixel centres over a grid spanning ``[low, high)``.

    Half-pixel centres with clamping at the ends, as ``torch.nn.functional.interpolate(...,
    mode="bilinear", align_corners=False)`` and Pillow's bilinear upsampling. Written as
    ``(x + 0.5 - low) * (cells / span) - 0.5`` so that for ``low = 0`` and ``span`` = the image it
    is bit for bit the arithmetic ``evaluate`` always used.
    """
    source = np.clip((pixels + 0.5 - low) * (cells / (high - low)) - 0.5, 0.0, None)
    below = np.minimum(np.floor(source).astype(np.int64), cells - 1)
    above = np.minimum(below + 1, cells - 1)
    frac = source - below
    weights = np.zeros((len(pixels), cells), dtype=np.float64)
    rows = np.arange(len(pixels))
    np.add.at(weights, (rows, below), 1.0 - frac)
    np.add.at(weights, (rows, above), frac)
    return weights


def place_mask(mask: np.ndarray, size: tuple[int, int], box: Box | None = None) -> Placement:
    """Place a ``[grid_h, grid_w]`` mask on a ``size = (width, height)`` pixel grid.

    ``box`` is where the grid lies on that pixel grid (:func:`grid_box` for a photo, or ``None``
    when the pixels are exactly what the grid covers, e.g. the model input in ``evaluate``).
    Values are taken as given (no clipping: ``evaluate`` ranks signed maps too).
    """
    grid = np.asarray(mask, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D [grid_h, grid_w] array, got shape {grid.shape}")
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    left, top, right, bottom = (0.0, 0.0, float(width), float(height)) if box is None else box
    if not (right > left and bottom > top):
        raise ValueError(f"the grid's box must have a positive area, got {box!r}")
    x0, x1 = _seen_span(left, right, width)
    y0, y1 = _seen_span(top, bottom, height)
    heat = np.zeros((height, width), dtype=np.float64)
    if x1 > x0 and y1 > y0:
        rows = _axis_weights(np.arange(y0, y1, dtype=np.float64), top, bottom, grid.shape[0])
        cols = _axis_weights(np.arange(x0, x1, dtype=np.float64), left, right, grid.shape[1])
        heat[y0:y1, x0:x1] = rows @ grid @ cols.T
    return Placement(heat=heat, window=(x0, y0, x1, y1), box=(left, top, right, bottom))
