"""Explain many images: batches in, files out, one bad image never sinks the rest.

The data flows one way: image file -> load (``runtime.images``, once per image) ->
``Explainer.explain`` (the route the benchmark times: parts side by side, each from image to
mask on one core) -> overlay / ``.npy`` / ``.json`` (``outputs``). Every file is written
atomically and an image's JSON is written last, so an interrupted run leaves either complete
outputs or none for each image, and a rerun skips what is complete. Progress notices go to
the ``vit_explain.pipeline`` logger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .atomic import save_json, save_npy, save_png
from .discovery import InputImage
from .errors import ImageError
from .methods import CLASS_SPECIFIC_METHODS
from .outputs import output_stem, overlay
from .outputs.placement import model_box
from .runtime import Explainer
from .runtime.images import input_notices, load_image

__all__ = [
    "FORMATS", "ExplainSettings", "ImageOutcome", "Preview", "explain_decoded", "explain_images", "map_label", "outputs_for",
    "thumbnail",
]

logger = logging.getLogger(__name__)

FORMATS = ("png", "npy", "json")


@dataclass(frozen=True)
class ExplainSettings:
    """What to compute and what to write, fixed for a whole run."""

    method: str
    head_fusion: str | None  # None for methods that do not fuse heads (gae)
    discard_ratio: float | None  # None for methods that do not discard (gae, attention)
    categories: tuple[int, ...] | None = None  # one map per category; None: rollout or default target
    default_target: str = "top1"  # how a map without a category is named: "top1" or "features"
    formats: tuple[str, ...] = FORMATS
    colormap: str = "jet"
    alpha: float = 0.5
    overwrite: bool = False
    start_layer: int = 0
    model_sha256: str = ""  # the exported weights' hash: a rerun with another model redoes everything

    def recorded(self) -> dict:
        """The settings an image's JSON records (and a rerun compares before skipping)."""
        return {
            "method": self.method,
            "head_fusion": self.head_fusion,
            "discard_ratio": self.discard_ratio,
            "start_layer": self.start_layer,
            "model_sha256": self.model_sha256,
        }


@dataclass
class Preview:
    """What a report shows of an image explained in this run, kept from memory so the report
    reads back nothing the run just wrote: thumbnails, and the JSON record (``{}`` when no JSON
    was written, so that the report says what it would say reading the files)."""

    thumb: Image.Image
    overlays: dict[str, Image.Image]  # map label -> thumbnail of its overlay, as written
    record: dict


@dataclass
class ImageOutcome:
    item: InputImage
    status: str  # "done", "skipped" or "failed"
    error: str | None = None
    files: dict[str, Path] = field(default_factory=dict)  # as outputs_for names them
    preview: Preview | None = None  # only when asked for (``previews``), for images done now


def map_label(method: str, category: int | None, default_target: str = "top1") -> str:
    if method not in CLASS_SPECIFIC_METHODS:
        return method
    return f"{method}.{default_target if category is None else category}"


def _map_categories(settings: ExplainSettings) -> list[int | None]:
    if settings.method not in CLASS_SPECIFIC_METHODS:
        return [None]
    return list(settings.categories) if settings.categories else [None]


def outputs_for(output_dir: Path, item: InputImage, settings: ExplainSettings) -> dict[str, Path]:
    """Every file an image's outputs consist of, keyed by a short name."""
    stem = output_stem(output_dir, item.rel)
    files: dict[str, Path] = {}
    for category in _map_categories(settings):
        label = map_label(settings.method, category, settings.default_target)
        if "png" in settings.formats:
            files[f"{label}.png"] = stem.with_name(f"{stem.name}.{label}.png")
        if "npy" in settings.formats:
            files[f"{label}.npy"] = stem.with_name(f"{stem.name}.{label}.npy")
    if "json" in settings.formats:  # one per image and method: runs with other methods keep theirs
        files["json"] = stem.with_name(f"{stem.name}.{settings.method}.json")
    return files


def _is_complete(files: dict[str, Path], settings: ExplainSettings) -> bool:
    if not all(path.is_file() for path in files.values()):
        return False
    if "json" not in files:
        return True
    try:
        recorded = json.loads(files["json"].read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in settings.recorded().items())


def _batches(items: Sequence[InputImage], size: int) -> Iterator[Sequence[InputImage]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def explain_images(
    explainer: Explainer,
    items: Sequence[InputImage],
    output_dir: Path,
    settings: ExplainSettings,
    batch_size: int = 8,
    previews: int = 0,
) -> Iterator[ImageOutcome]:
    """Explain ``items`` in batches, yielding one outcome per image as soon as it is written.

    Each image is decoded once; the odd ones that are still explained (an animated image's
    first frame, an image far smaller than the model's input) get one INFO line on the
    ``vit_explain.pipeline`` logger, so nothing is changed silently. ``previews``: the first
    that many of ``items`` done in this run carry a :class:`Preview` (for a report).
    Closing the generator (Ctrl-C) cancels the queued file work and waits for the running part."""
    wanted = {id(item) for item in items[:previews]}
    pending: list[tuple[InputImage, dict[str, Path]]] = []
    for item in items:
        try:
            files = outputs_for(output_dir, item, settings)
        except ValueError as exc:  # the output name would leave the output folder (a symlink in it)
            yield ImageOutcome(item, "failed", f"{item.path}: {exc}")
            continue
        if not settings.overwrite and _is_complete(files, settings):
            yield ImageOutcome(item, "skipped", files=files)
        else:
            pending.append((item, files))

    # Decoding photos and encoding their full-size overlay PNGs take far longer than the graph
    # (about 50 ms and 300 ms for a 4-megapixel photo, against ~20 ms of graph per image), and
    # Pillow releases the GIL in both: a pool as wide as the explainer's spreads them over the cores.
    pool = ThreadPoolExecutor(max(1, explainer.workers), thread_name_prefix="vit-explain-files")
    try:
        for batch in _batches(pending, batch_size):
            loaded: list[tuple[InputImage, dict[str, Path], Image.Image]] = []
            for (item, files), image in zip(batch, pool.map(_load_or_error, [item for item, _ in batch]), strict=True):
                if isinstance(image, ImageError):
                    yield ImageOutcome(item, "failed", str(image))
                else:
                    for notice in input_notices(image, explainer.metadata.preprocess.input_size[1:]):
                        logger.info("%s: %s", item.path, notice)
                    loaded.append((item, files, image))
            if loaded:
                yield from _explain_batch(explainer, loaded, settings, pool, wanted)
    finally:  # also on Ctrl-C or an early close: queued writes are dropped, a rerun redoes them
        pool.shutdown(wait=True, cancel_futures=True)


def _load_or_error(item: InputImage) -> Image.Image | ImageError:
    """The one decode of an image file (on the file pool), or the reason it cannot be read."""
    try:
        return load_image(item.path)
    except ImageError as exc:
        return exc


def explain_decoded(explainer: Explainer, images: Sequence[Image.Image], settings: ExplainSettings):
    """The one explain step every output format shares (files here, Parquet shards in
    :mod:`vit_explain.datasets`): one ``Explainer.explain`` call per map category on decoded
    images. Returns ``(per_category, top5)``: ``[(category, Explanation), ...]`` and each
    image's top-5 predictions."""
    per_category = []
    for category in _map_categories(settings):
        result = explainer.explain(
            images, method=settings.method, head_fusion=settings.head_fusion,
            discard_ratio=settings.discard_ratio, category_index=category, start_layer=settings.start_layer,
        )
        per_category.append((category, result))
    return per_category, per_category[0][1].top_k(5)


def _explain_batch(explainer: Explainer, loaded, settings: ExplainSettings, pool: ThreadPoolExecutor,
                   wanted: set[int]) -> Iterator[ImageOutcome]:
    """One ``Explainer.explain`` call per map category on the decoded images: the explainer cuts
    the batch into parts that each go from image to mask on one core (the benchmark's route)."""
    per_category, top5 = explain_decoded(explainer, [image for _, _, image in loaded], settings)

    def write(index: int) -> ImageOutcome:
        item, files, image = loaded[index]
        try:
            return _write_outputs(item, files, image, index, per_category, top5[index], explainer, settings,
                                  id(item) in wanted)
        except OSError as exc:
            return ImageOutcome(item, "failed", f"cannot write outputs for {item.path}: {exc}")

    yield from pool.map(write, range(len(loaded)))


def _write_outputs(item, files, image, index, per_category, top5, explainer, settings, preview: bool) -> ImageOutcome:
    """Every file of one image, its JSON last; with ``preview``, the report's thumbnails too."""
    meta = explainer.metadata
    box = model_box(image.size, meta)  # where the model looked: the overlay paints only there
    maps, overlays = [], {}
    for category, result in per_category:
        label = map_label(settings.method, category, settings.default_target)
        mask = result.masks[index]
        explained = result.category_index[index] if result.category_index else None
        entry = {"label": label, "category_index": explained}
        if explained is not None:
            entry["category_name"] = meta.class_name(explained)
        if f"{label}.png" in files:
            painted = overlay(image, mask, settings.colormap, settings.alpha, box)
            save_png(files[f"{label}.png"], painted)
            entry["overlay"] = files[f"{label}.png"].name
            if preview:
                overlays[label] = thumbnail(painted.convert("RGB"))
        if f"{label}.npy" in files:
            save_npy(files[f"{label}.npy"], mask)
            entry["mask"] = files[f"{label}.npy"].name
        maps.append(entry)
    record = {
        "source": str(item.path),
        "image_size": list(image.size),
        "crop_window": [round(v, 4) for v in box],  # the .npy grid's area, in image pixels
        "model": {"source_model": meta.source_model, "weights": meta.weights, "file": str(explainer.session.path)},
        "settings": settings.recorded(),
        "grid_size": list(meta.grid_size),
        "maps": maps,
        "predictions": [{"index": i, "name": name, "probability": round(p, 6)} for i, name, p in top5],
    }
    if "json" in files:
        save_json(files["json"], record)
    shown = Preview(thumbnail(image), overlays, record if "json" in files else {}) if preview else None
    return ImageOutcome(item, "done", files=files, preview=shown)


def thumbnail(image: Image.Image, width: int = 200) -> Image.Image:
    """A copy at most ``width`` wide and ``4 * width`` tall: reports never hold full-size photos."""
    image = image.copy()
    image.thumbnail((width, width * 4))
    return image
