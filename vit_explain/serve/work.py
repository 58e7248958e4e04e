"""What the server's threads do: decode an instance, explain a batch, render an answer.

Why apart from the app: these are the blocking steps (base64 and image decoding, the graph call
and the maths, painting and encoding overlays, turning masks into JSON), and each runs on a
thread, never on the event loop. They take the library's one route: images through
:func:`vit_explain.runtime.images.load_image_bytes` (the checks and conversion ``load_image``
applies to files), explanations through :meth:`Explainer.explain` with the settings
:func:`~vit_explain.methods.resolve_settings` resolved, placement and overlays through
:mod:`vit_explain.outputs`, so a mask served is the mask the Python API gives.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageError
from ..methods import Settings
from ..outputs import overlay
from ..outputs.placement import model_box
from ..runtime import Explainer
from ..runtime.images import load_image_bytes
from .protocol import Instance, RequestError, decode_b64, resolve_instance

__all__ = ["PREDICT", "Prepared", "Explained", "batch_key", "prepare", "run_batch", "render"]

#: The batch key of ``:predict`` instances: a forward pass, no explanation settings.
PREDICT = ("predict",)


@dataclass(frozen=True)
class Prepared:
    """An instance ready for the graph: decoded, its settings resolved and checked."""

    instance: Instance
    image: Image.Image
    settings: Settings | None  # None for :predict
    category: int | None


@dataclass(frozen=True)
class Explained:
    """One instance's share of a batch call."""

    mask: np.ndarray | None  # [grid_h, grid_w], None for :predict
    top_k: list[tuple[int, str, float]]
    category: int | None  # the class explained (the top-1 one when none was asked), class-specific methods
    settings: dict[str, Any] | None


def prepare(instance: Instance, explainer: Explainer, max_pixels: int | None, explain: bool) -> Prepared:
    """Decode and check one instance (on a worker thread); a RequestError names the instance."""
    settings, category = resolve_instance(instance, explainer.metadata) if explain else (None, None)
    data = decode_b64(instance)
    try:
        image = load_image_bytes(data, f"of instance {instance.index}", max_pixels)
    except ImageError as exc:
        raise RequestError(str(exc).replace("cannot read image of instance", "instance", 1)) from None
    return Prepared(instance, image, settings, category)


def batch_key(prepared: Prepared) -> Hashable:
    """Instances with equal keys share a graph call: same settings, and all with a class or all
    without (without one, the graph explains each image's own top-1 class)."""
    if prepared.settings is None:
        return PREDICT
    return prepared.settings, prepared.category is not None


def run_batch(explainer: Explainer, key: Hashable, items: Sequence[Prepared]) -> list[Explained]:
    """One :meth:`Explainer.explain` call for a batch of one key (on the batcher's thread)."""
    images = [item.image for item in items]
    top_k = max(item.instance.top_k for item in items)
    if key == PREDICT:  # the forward graph only: last-layer attention costs no backward pass
        result = explainer.explain(images, method="attention")
        return [Explained(None, ranked[: item.instance.top_k], None, None)
                for item, ranked in zip(items, result.top_k(top_k), strict=True)]
    settings, with_category = key
    result = explainer.explain(
        images, method=settings.method, head_fusion=settings.head_fusion, discard_ratio=settings.discard_ratio,
        category_index=[item.category for item in items] if with_category else None, start_layer=settings.start_layer,
    )
    explained = result.category_index or (None,) * len(items)
    return [
        Explained(result.masks[i], ranked[: item.instance.top_k], explained[i], result.settings())
        for i, (item, ranked) in enumerate(zip(items, result.top_k(top_k), strict=True))
    ]


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render(prepared: Prepared, explained: Explained, explainer: Explainer) -> tuple[dict, dict | None]:
    """The instance's prediction and explanation as JSON-ready dicts (on a worker thread). Mask
    values are the float32 values exactly (a float32 converts to a float64 without loss)."""
    prediction = {"top_k": [{"index": i, "name": name, "probability": p} for i, name, p in explained.top_k]}
    if explained.mask is None:
        return prediction, None
    box = model_box(prepared.image.size, explainer.metadata)
    explanation = {
        "method": explained.settings["method"],
        "category_index": explained.category,
        "settings": explained.settings,
        "mask": explained.mask.astype(np.float64).tolist(),
        "mask_shape": list(explained.mask.shape),
        "crop_window": [round(v, 4) for v in box],
    }
    if prepared.instance.overlay:
        explanation["overlay_png"] = {"b64": _png_b64(overlay(prepared.image, explained.mask, box=box))}
    return prediction, explanation
