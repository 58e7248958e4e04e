"""What ``Explainer.explain`` accepts, turned into what the graph takes: pixels and categories.

Why apart from the Explainer: the coercion rules (a path, a PIL image, a list of either, or a
preprocessed array checked against the model's input size) and the category rules (one for all,
one per image, each in range) are shared with evaluate, and are easier to test without a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..metadata import ModelMetadata
from .images import load_image
from .preprocess import preprocess_batch, preprocess_image

__all__ = ["ImageInput", "as_batch", "check_pixels", "preprocess", "expand_category_index", "class_weights"]

ImageInput = str | os.PathLike | Image.Image
#: ``map(function, items)`` over a thread pool, or None to run on the calling thread.
PoolMap = Callable[[Callable, Iterable], Iterable] | None


def check_pixels(pixels: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """A preprocessed ``[B, 3, H, W]`` array as contiguous float32, its shape checked first (a
    wrong size would otherwise fail deep inside onnxruntime, after any other work)."""
    expected = metadata.preprocess.input_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != tuple(expected):
        raise ValueError(
            f"a preprocessed array must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(pixels.shape)}"
        )
    return np.ascontiguousarray(pixels, dtype=np.float32)


def as_batch(
    inputs: Sequence[ImageInput] | ImageInput | np.ndarray, metadata: ModelMetadata
) -> list[ImageInput] | np.ndarray:
    """One image or many as a list (decoded later, where the work runs), or a checked array."""
    if isinstance(inputs, np.ndarray):
        return check_pixels(inputs, metadata)
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        return [inputs]
    return list(inputs)


def preprocess(
    inputs: Sequence[ImageInput] | ImageInput | np.ndarray, metadata: ModelMetadata, pool_map: PoolMap = None
) -> np.ndarray:
    """Paths or PIL images -> ``[B, 3, H, W]`` float32, exactly as timm's eval transform (an
    array is checked and passed through). ``pool_map``: decode and resize on a pool, as those
    release the GIL and overlap across images."""
    if isinstance(inputs, np.ndarray):
        return check_pixels(inputs, metadata)
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    config = metadata.preprocess
    if pool_map is None or len(inputs) < 2:
        return preprocess_batch([load_image(item) for item in inputs], config)
    return np.stack(list(pool_map(lambda item: preprocess_image(load_image(item), config), inputs)))


def expand_category_index(category_index, batch: int, num_outputs: int, kind: str = "outputs") -> tuple[int, ...] | None:
    """One category per image from ``None``, one int, or one per image; a clear ValueError otherwise."""
    if category_index is None:
        return None
    indices = [category_index] if isinstance(category_index, (int, np.integer)) else list(category_index)
    if len(indices) == 1:
        indices = indices * batch
    if len(indices) != batch:
        raise ValueError(f"got {len(indices)} category indices for {batch} images (give one, or one per image)")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < num_outputs:
            raise ValueError(
                f"category index {index!r} is out of range: the model has {num_outputs} {kind} (0..{num_outputs - 1})"
            )
    return tuple(int(i) for i in indices)


def class_weights(categories: Sequence[int], num_outputs: int) -> np.ndarray:
    """One-hot ``[B, outputs]`` float32 weights for the categories (one per image): the output
    the graph's backward pass starts from."""
    weights = np.zeros((len(categories), num_outputs), dtype=np.float32)
    weights[np.arange(len(categories)), list(categories)] = 1.0
    return weights
