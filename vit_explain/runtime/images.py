"""Load user images robustly: whatever Pillow can read becomes one 8-bit RGB image.

Why this module exists rather than ``Image.open(p).convert("RGB")``:

* ``convert("RGB")`` drops alpha onto *black* and clips 16-bit / 32-bit data to 255,
  so a transparent PNG or a 16-bit scan would be explained as a different picture
  than the one the user sees. Here alpha is composited on white and high-bit-depth
  data is rescaled.
* Phone photos store their rotation in EXIF; without ``exif_transpose`` the mask would
  be drawn on a sideways image.
* Pillow decodes lazily: a truncated or corrupt file only fails at ``load()``, often
  deep inside later code. Loading eagerly here turns every failure into one
  :class:`~vit_explain.errors.ImageError` that names the file and the reason.
* Decompression bombs (tiny files declaring gigapixel images) are refused from the
  header, before any pixel is decoded.

Only Pillow and numpy are used: the runtime must not import torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vit_explain.errors import ImageError, one_line

__all__ = [
    "DEFAULT_MAX_PIXELS", "BACKGROUND", "NOTICE_KEY", "SMALL_INPUT_FACTOR", "input_notices", "load_image", "load_image_bytes",
    "is_image_file", "to_rgb",
]

#: Largest image (width * height) accepted by default: Pillow's own hard limit
#: (twice ``Image.MAX_IMAGE_PIXELS``), so a 100-megapixel photo still loads.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

#: Colour that transparent pixels are composited onto. White, because that is what
#: a viewer shows for a transparent PNG on a page, so the model sees what the user sees.
BACKGROUND = (255, 255, 255)

# Ghostscript is run to rasterise EPS: never hand untrusted files to an interpreter.
_EXCLUDED_FORMATS = frozenset({"EPS"})
_formats: tuple[str, ...] | None = None

#: Formats phones and cameras write that Pillow reads only through a plugin: said in the error.
#: With ``pillow-heif`` installed, :func:`_allowed_formats` registers it and such files load.
_PLUGIN_HINTS = {
    suffix: f" (Pillow reads {suffix[1:].upper()} with the pillow-heif plugin: pip install pillow-heif)"
    for suffix in (".heic", ".heif")
}

#: Where :func:`load_image` records, in the returned image's ``info``, what it did that a user
#: would not expect (a tuple of one-line notices): the runtime prints nothing itself.
NOTICE_KEY = "vit_explain.notices"

#: An image whose width or height is below the model input's divided by this is "far smaller":
#: it is upscaled that much or more, and the model sees mostly interpolation.
SMALL_INPUT_FACTOR = 2

_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _allowed_formats() -> tuple[str, ...]:
    """Every format Pillow can open, in Pillow's own probing order, minus the unsafe ones; HEIC and
    HEIF too when the ``pillow-heif`` plugin is installed (phones save photos as HEIC)."""
    global _formats
    if _formats is None:
        Image.init()
        _register_heif_plugin()
        _formats = tuple(f for f in Image.ID if f not in _EXCLUDED_FORMATS)
    return _formats



def _register_heif_plugin() -> None:
    """Let Pillow open HEIC/HEIF when ``pillow-heif`` is installed; nothing happens otherwise."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether Pillow recognises the file's *content* as an image (extension is ignored).

    Cheap: only the header is parsed, no pixels are decoded. A file that is an image but
    would be refused by :func:`load_image` (truncated, too large) still counts as an
    image, so that loading it reports the precise reason instead of skipping it silently.
    """
    try:
        with open(path, "rb") as fh, Image.open(fh, formats=_allowed_formats()):
            return True
    except Image.DecompressionBombError:
        return True
    except Exception:
        return False


def load_image(
    source: str | os.PathLike[str] | Image.Image,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read ``source`` into an 8-bit RGB image, upright according to its EXIF orientation.

    Args:
        source: a path, or an already opened Pillow image (converted the same way).
        max_pixels: refuse images whose declared ``width * height`` exceeds this
            (decompression-bomb guard); ``None`` disables this check. Pillow's global
            ``Image.MAX_IMAGE_PIXELS`` hard limit applies as well.
        target_size: ``(width, height)`` the image will be shrunk to later. When given,
            JPEG decoding is reduced (DCT scaling via ``Image.draft``) to the smallest
            power-of-two scale that keeps *both* sides at least ``max(target_size)``,
            which bounds memory for huge photos. This changes pixels slightly, so leave
            it ``None`` when exact parity with timm's own pipeline matters.

    Raises:
        ImageError: missing, empty, unreadable, truncated or oversized input; the
            message is one line naming the file and the reason.
    """
    if isinstance(source, Image.Image):
        label = "<in-memory image>"
        try:
            source.load()
            return _finish(source)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"cannot read image {label}: {one_line(exc)}") from exc
    return _load_path(os.fspath(source), max_pixels, target_size)


def load_image_bytes(data: bytes, label: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for an image held in memory (a request body): the same checks, the same
    decode and conversion, the same one-line :class:`ImageError` naming ``label``."""
    return _load(lambda: io.BytesIO(data), label, max_pixels, None)


def _load_path(path: str, max_pixels: int | None, target_size: tuple[int, int] | None) -> Image.Image:
    return _load(lambda: open(path, "rb"), path, max_pixels, target_size)


def _load(opener: Callable[[], BinaryIO], label: str, max_pixels: int | None,
          target_size: tuple[int, int] | None) -> Image.Image:
    """Open, check, fully decode and convert; every failure becomes an ImageError naming ``label``."""
    try:
        with opener() as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                raise ImageError(f"cannot read image {label}: the file is empty")
            fh.seek(0)
            with Image.open(fh, formats=_allowed_formats()) as img:
                _check_size(img, label, max_pixels)
                if target_size is not None and img.format == "JPEG":
                    side = max(1, int(max(target_size)))
                    img.draft(None, (side, side))
                img.load()  # decode now, inside the try: truncation surfaces here
                frames = getattr(img, "n_frames", 1)
                rgb = _finish(img)
                if frames > 1:
                    rgb.info[NOTICE_KEY] = (f"animated image ({frames} frames): the first frame is explained",)
                return rgb
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"cannot read image {label}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"cannot read image {label}: it is a directory") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image {label}: permission denied") from exc
    except Image.UnidentifiedImageError as exc:
        hint = _PLUGIN_HINTS.get(os.path.splitext(label)[1].lower(), "")
        raise ImageError(f"cannot read image {label}: not an image, or a format Pillow cannot read{hint}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"cannot read image {label}: refused, {one_line(exc)}") from exc
    except MemoryError as exc:
        raise ImageError(f"cannot read image {label}: out of memory while decoding it") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"cannot read image {label}: {one_line(exc)}") from exc


def input_notices(image: Image.Image, model_size: tuple[int, int]) -> list[str]:
    """One-line notices for an input that is explained, but not as a user might assume: those
    :func:`load_image` recorded, and an image far smaller than the model's ``(height, width)``
    input (upscaled by :data:`SMALL_INPUT_FACTOR` or more)."""
    notices = list(image.info.get(NOTICE_KEY, ()))
    width, height = image.size
    model_h, model_w = (int(side) for side in model_size)
    if width * SMALL_INPUT_FACTOR <= model_w or height * SMALL_INPUT_FACTOR <= model_h:
        factor = max(model_w / width, model_h / height)
        notices.append(f"{width}x{height} is far smaller than the model's {model_w}x{model_h} input: upscaled about {factor:.0f}x")
    return notices


def _check_size(img: Image.Image, path: str, max_pixels: int | None) -> None:
    """Refuse from the header alone, before decoding allocates anything."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"cannot read image {path}: it has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"cannot read image {path}: refused, {width}x{height} = {width * height} pixels exceeds "
            f"the limit of {max_pixels} (possible decompression bomb)"
        )


def _finish(img: Image.Image) -> Image.Image:
    """Upright, RGB, and a new object that does not reference the (soon closed) file."""
    upright = _exif_upright(img)
    rgb = to_rgb(upright)
    if rgb is img:
        rgb = img.copy()
    return rgb


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; broken EXIF is ignored since the pixels are still fine."""
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:
        return img
    return img if upright is None else upright


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would display it.

    * alpha (RGBA, LA, PA, palette or L/RGB with a transparency key) is composited on
      :data:`BACKGROUND` (white) instead of being dropped to black;
    * 16-bit integer data is scaled by 255/65535 (65535 -> 255, 32768 -> 128), not
      clipped; ``I`` (32-bit) data within 0..65535 is treated as 16-bit, anything else is
      stretched from its min..max;
    * float (``F``) data in 0..1 is scaled by 255, in 0..255 kept, otherwise stretched;
    * everything else (1, L, P, CMYK, YCbCr, LAB, HSV, ...) goes through ``convert``.

    Returns ``img`` itself when it is already opaque RGB.
    """
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(_high_bit_depth_to_uint8(img)).convert("RGB")
    if _has_transparency(img):
        return _composite_on_background(img.convert("RGBA"))
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _has_transparency(img: Image.Image) -> bool:
    """Alpha channel, or a palette / colour-key transparency entry (PNG tRNS, GIF)."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _composite_on_background(rgba: Image.Image) -> Image.Image:
    """Alpha-blend onto an opaque background; fully transparent pixels become the background."""
    canvas = Image.new("RGB", rgba.size, BACKGROUND)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Map 16/32-bit integer or float pixels to 0..255 uint8 (see :func:`to_rgb`)."""
    data = np.asarray(img)
    if img.mode == "F":
        return _float_to_uint8(data.astype(np.float64))
    values = data.astype(np.int64)
    if img.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
        # round(v * 255 / 65535) == round(v / 257), exact in integers, half rounds up
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    return _stretch(values.astype(np.float64))


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float images have no standard range: guess the common conventions, else stretch."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map min..max to 0..255 (a constant image becomes black)."""
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
