"""timm's evaluation transform, re-implemented with Pillow and numpy.

The runtime must not import torch, yet the exported model only behaves like the
original when its input is prepared exactly as ``timm.data.transforms_imagenet_eval``
prepares it. Resizing is therefore done with the very same Pillow call torchvision
makes (``img.resize((w, h), resample)``), and every size and offset below copies the
arithmetic of timm / torchvision *including its rounding quirks*:

* ``center`` with a square target: ``torchvision.transforms.Resize(int)`` sets the short
  side to ``floor(size / crop_pct)`` and the long side to
  ``int(short * long / short_in)`` (truncation, not rounding).
* ``center`` with a non-square target: timm uses ``ResizeKeepRatio(longest=0)``, i.e.
  the *short-edge-matching* scale ``min(h / th, w / tw)`` and then ``round()`` of each
  side (Python's round-half-to-even), not truncation and not an exact resize.
* ``squash``: resize to exactly ``floor(h / crop_pct) x floor(w / crop_pct)``.
* ``border``: ``ResizeKeepRatio(longest=1)`` then ``CenterCropOrPad`` filled with
  ``round(255 * mean)``.
* ``CenterCrop`` offsets are ``int(round((size - crop) / 2))`` (half-to-even again: a
  surplus of 5 gives offset 2, a surplus of 3 gives 2); when the image is smaller, it is
  padded by ``(crop - size) // 2`` before and the rest after (zeros for ``center`` and
  ``squash``).
* an explicit ``resize_size`` (Hugging Face and torchvision processors) replaces the resize
  step: one value is the short side (``Resize(int)`` / ``shortest_edge``, as ``center``), two
  an exact ``height x width`` (a non-square photo is stretched); the centre crop follows.
* ``center_floor``: as ``center``, but the crop offset is Hugging Face's ``(size - crop) // 2``.
* ``ToTensor`` + ``Normalize`` are ``(x / 255 - mean) / std`` in float32.

Everything after the resize is vectorised numpy; the output matches timm bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vit_explain.metadata import PreprocessConfig
from vit_explain.runtime.images import to_rgb

__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "Geometry",
    "resize_geometry",
    "scale_size",
    "preprocess_image",
    "preprocess_batch",
]

#: timm's interpolation names -> Pillow resampling filters (``timm.data.transforms``).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

CROP_MODES = ("center", "squash", "border", "center_floor")

#: timm's ``DEFAULT_CROP_PCT``, used when the config's crop_pct is 0 / missing.
_DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Geometry:
    """Where the model input comes from in the original image.

    Output pixel ``(x, y)`` is pixel ``(x + crop_left, y + crop_top)`` of the image
    resized to ``resized_size``; negative offsets (or windows running past the resized
    image) are padding filled with ``fill``. Sizes are ``(width, height)``.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_left: int
    crop_top: int
    output_size: tuple[int, int]
    fill: tuple[int, int, int]

    @property
    def needs_padding(self) -> bool:
        """Whether part of the model input lies outside the resized image."""
        (rw, rh), (ow, oh) = self.resized_size, self.output_size
        return (
            self.crop_left < 0
            or self.crop_top < 0
            or self.crop_left + ow > rw
            or self.crop_top + oh > rh
        )

    def crop_box_in_original(self) -> tuple[float, float, float, float]:
        """The model input window as ``(left, top, right, bottom)`` in original pixels.

        Used to place a patch-grid heat map back onto the user's image; the box extends
        beyond the image where the input was padded.
        """
        (w, h), (rw, rh), (ow, oh) = self.original_size, self.resized_size, self.output_size
        sx, sy = w / rw, h / rh
        left, top = self.crop_left * sx, self.crop_top * sy
        return (left, top, left + ow * sx, top + oh * sy)


def _crop_pct(cfg: PreprocessConfig) -> float:
    """timm: ``crop_pct = crop_pct or DEFAULT_CROP_PCT``."""
    return float(cfg.crop_pct or _DEFAULT_CROP_PCT)


def _crop_mode(cfg: PreprocessConfig) -> str:
    """Validate the mode instead of silently treating typos as ``center`` like timm does."""
    mode = cfg.crop_mode or "center"
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {cfg.crop_mode!r}, expected one of {', '.join(CROP_MODES)}")
    return mode


def _resample(cfg: PreprocessConfig) -> Image.Resampling:
    try:
        return INTERPOLATIONS[cfg.interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {cfg.interpolation!r}, expected one of {', '.join(INTERPOLATIONS)}"
        ) from None


def scale_size(cfg: PreprocessConfig) -> tuple[int, int]:
    """The pre-crop target ``(height, width)``: ``floor(size / crop_pct)`` per side, as timm."""
    pct = _crop_pct(cfg)
    return (math.floor(cfg.height / pct), math.floor(cfg.width / pct))


def _short_side_resize(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: short side -> size, long side truncated (``int()``)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _keep_ratio_resize(h: int, w: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm ``ResizeKeepRatio.get_params`` (no randomness): Python ``round`` per side."""
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return (round(h * 1.0 / ratio), round(w * 1.0 / ratio))


def _resized_hw(h: int, w: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Size after the resize step: the config's explicit ``resize_size`` (short side, or exact
    height x width), else timm's for this crop mode."""
    if len(cfg.resize_size) == 2:
        return (int(cfg.resize_size[0]), int(cfg.resize_size[1]))
    if len(cfg.resize_size) == 1:
        return _short_side_resize(h, w, int(cfg.resize_size[0]))
    target = scale_size(cfg)
    mode = _crop_mode(cfg)
    if mode == "squash":
        return target
    if mode == "border":
        return _keep_ratio_resize(h, w, target, longest=1.0)
    if target[0] == target[1]:
        return _short_side_resize(h, w, target[0])
    return _keep_ratio_resize(h, w, target, longest=0.0)


def _crop_start(size: int, crop: int, mode: str = "center") -> int:
    """torchvision ``center_crop`` offset along one axis; negative means padding before.
    ``center_floor``: Hugging Face's ``(size - crop) // 2`` (an odd surplus leaves the extra
    pixel on the right / bottom, where torchvision's half-to-even rounding may not)."""
    if mode == "center_floor":
        return (size - crop) // 2
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def _fill(cfg: PreprocessConfig) -> tuple[int, int, int]:
    """Padding colour: timm's ``round(255 * mean)`` in border mode, torchvision's 0 otherwise."""
    if _crop_mode(cfg) == "border":
        r, g, b = (round(255 * v) for v in cfg.mean)
        return (r, g, b)
    return (0, 0, 0)


def resize_geometry(orig_w: int, orig_h: int, cfg: PreprocessConfig) -> Geometry:
    """Resize and crop parameters timm would use for an ``orig_w x orig_h`` image.

    Sides are clamped to at least one pixel: for absurd aspect ratios timm itself would
    ask Pillow for a zero-sized image and fail.
    """
    rh, rw = _resized_hw(orig_h, orig_w, cfg)
    rh, rw = max(1, rh), max(1, rw)
    return Geometry(
        original_size=(orig_w, orig_h),
        resized_size=(rw, rh),
        crop_left=_crop_start(rw, cfg.width, _crop_mode(cfg)),
        crop_top=_crop_start(rh, cfg.height, _crop_mode(cfg)),
        output_size=(cfg.width, cfg.height),
        fill=_fill(cfg),
    )


def _check_config(cfg: PreprocessConfig) -> None:
    if cfg.input_size[0] != 3 or len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise ValueError(f"only 3-channel (RGB) models are supported, got input_size {cfg.input_size}")
    _crop_mode(cfg)
    _resample(cfg)


def _axis_slices(start: int, size: int, crop: int) -> tuple[slice, slice]:
    """(source slice in the resized image, destination slice in the output) for one axis."""
    dst_lo, src_lo = max(0, -start), max(0, start)
    length = max(0, min(size - src_lo, crop - dst_lo))
    return slice(src_lo, src_lo + length), slice(dst_lo, dst_lo + length)


def _crop_to_canvas(pixels: np.ndarray, geo: Geometry) -> np.ndarray:
    """Center-crop and/or pad an HWC uint8 array to the output size in one copy."""
    (rw, rh), (ow, oh) = geo.resized_size, geo.output_size
    src_y, dst_y = _axis_slices(geo.crop_top, rh, oh)
    src_x, dst_x = _axis_slices(geo.crop_left, rw, ow)
    if not geo.needs_padding:
        return pixels[src_y, src_x]
    canvas = np.empty((oh, ow, 3), dtype=np.uint8)
    canvas[...] = np.asarray(geo.fill, dtype=np.uint8)
    canvas[dst_y, dst_x] = pixels[src_y, src_x]
    return canvas


def _normalize_into(out: np.ndarray, pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """``(x / 255 - mean) / std`` in float32 with the same op order as ToTensor + Normalize."""
    np.copyto(out, pixels.transpose(2, 0, 1), casting="safe")
    out /= np.float32(255)
    out -= mean
    out /= std


def _stats(cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return mean, std


def _resized_pixels(img: Image.Image, geo: Geometry, resample: Image.Resampling) -> np.ndarray:
    """RGB, then the same ``Image.resize`` call torchvision makes (skipped when a no-op)."""
    rgb = to_rgb(img)
    if rgb.size != geo.resized_size:
        rgb = rgb.resize(geo.resized_size, resample)
    return np.asarray(rgb, dtype=np.uint8)


def _preprocess_into(out: np.ndarray, img: Image.Image, cfg: PreprocessConfig) -> None:
    geo = resize_geometry(img.width, img.height, cfg)
    pixels = _resized_pixels(img, geo, _resample(cfg))
    mean, std = _stats(cfg)
    _normalize_into(out, _crop_to_canvas(pixels, geo), mean, std)


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One image -> float32 ``[3, H, W]`` exactly as timm's eval transform would produce.

    ``img`` should come from :func:`vit_explain.runtime.images.load_image`; other modes
    are converted with the same rules (alpha on white, 16-bit rescaled).
    """
    return preprocess_batch([img], cfg)[0]


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """Several images -> one C-contiguous float32 ``[B, 3, H, W]`` array, written in place."""
    _check_config(cfg)
    batch = np.empty((len(images), 3, cfg.height, cfg.width), dtype=np.float32)
    for i, img in enumerate(images):
        _preprocess_into(batch[i], img, cfg)
    return batch
