"""A Hugging Face image processor's settings as the runtime's :class:`PreprocessConfig`.

The runtime reproduces one transform (resize, centre crop, ``x / 255``, mean/std) without torch
or transformers, so export reads what the processor would do (resize to an exact ``height x
width`` or by the shortest edge, the centre crop, resample filter, rescale factor, mean/std) and
writes it as plain numbers. Anything the runtime cannot reproduce is refused here, in one line,
rather than explained with a wrong input: no resize, a rescale other than ``1/255``, a longest
edge, a variable output size.

Reads the processor's attributes (``AutoImageProcessor.from_pretrained(folder)`` resolved the
defaults), so no transformers import is needed here.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from ..metadata import PreprocessConfig

__all__ = ["RESAMPLE_NAMES", "preprocess_from_processor"]

#: PIL's resampling codes (what ``resample`` holds in a preprocessor config) -> runtime names.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _size(value: Any, what: str) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def _three(value: Any) -> tuple[float, ...]:
    """A per-channel statistic; one number stands for all three channels."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _resample(value: Any) -> str:
    code = getattr(value, "value", value)
    if isinstance(code, int) and code in RESAMPLE_NAMES:
        return RESAMPLE_NAMES[code]
    name = str(getattr(value, "name", value)).lower()
    for known in RESAMPLE_NAMES.values():
        if known in name:
            return known
    raise ExportError(f"image processor resample {value!r} is not one the runtime reproduces ({', '.join(RESAMPLE_NAMES.values())})")


def _resize_and_crop(processor: Any) -> tuple[tuple[int, ...], tuple[int, int]]:
    """``(resize_size, (height, width) of the model input)`` from the processor's settings."""
    if not getattr(processor, "do_resize", True):
        raise ExportError("the image processor does not resize (do_resize=false): the model input size would vary")
    size = _size(getattr(processor, "size", None), "size")
    if "height" in size and "width" in size:
        resize: tuple[int, ...] = (size["height"], size["width"])
    elif set(size) == {"shortest_edge"}:
        resize = (size["shortest_edge"],)
    else:
        raise ExportError(f"image processor size {size} is not supported (need height and width, or shortest_edge alone)")
    if getattr(processor, "do_center_crop", False):
        crop = _size(getattr(processor, "crop_size", None), "crop_size")
        if not ("height" in crop and "width" in crop):
            raise ExportError(f"image processor crop_size {crop} is not supported (need height and width)")
        return resize, (crop["height"], crop["width"])
    if len(resize) != 2:
        raise ExportError("the image processor resizes by the shortest edge without a crop: the model input size would vary")
    return resize, (resize[0], resize[1])


def _scaled(resize: tuple[int, ...], crop: tuple[int, int], target: tuple[int, int]) -> tuple[int, ...]:
    """The resize for another input size (``--img-size``): scaled with the crop, so the crop
    keeps the same share of the photo."""
    ratio_h, ratio_w = target[0] / crop[0], target[1] / crop[1]
    if len(resize) == 1:
        return (max(target[0], target[1], round(resize[0] * min(ratio_h, ratio_w))),)
    return (max(target[0], round(resize[0] * ratio_h)), max(target[1], round(resize[1] * ratio_w)))


def preprocess_from_processor(processor: Any, input_size: tuple[int, int] | None = None) -> PreprocessConfig:
    """The processor's eval transform as a :class:`PreprocessConfig`; ``input_size`` (height,
    width) replaces its crop (``--img-size``), the resize scaled to match."""
    resize, crop = _resize_and_crop(processor)
    cropped = bool(getattr(processor, "do_center_crop", False))
    if input_size is not None and tuple(input_size) != crop:
        resize, crop = _scaled(resize, crop, tuple(input_size)), (int(input_size[0]), int(input_size[1]))
    if getattr(processor, "do_rescale", True):
        factor = float(getattr(processor, "rescale_factor", 1 / 255))
        if abs(factor * 255 - 1) > 1e-6:
            raise ExportError(f"image processor rescale_factor {factor} is not supported (the runtime divides by 255)")
    else:
        raise ExportError("the image processor does not rescale (do_rescale=false): pixel values 0..255 are not supported")
    if getattr(processor, "do_normalize", True):
        mean, std = _three(processor.image_mean), _three(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    config = PreprocessConfig(
        input_size=(3, crop[0], crop[1]),
        interpolation=_resample(getattr(processor, "resample", 2)),
        mean=mean,
        std=std,
        crop_pct=1.0,
        crop_mode="center_floor" if cropped else "center",  # transformers crops at (size - crop) // 2
        resize_size=tuple(int(v) for v in resize),
    )
    config.check()
    return config
