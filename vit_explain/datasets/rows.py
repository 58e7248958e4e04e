"""The Parquet row schema: one row per (image, map), readable by pandas or pyarrow without Ray.

Both engines build their rows here, from the same explain step as the files path
(:func:`vit_explain.pipeline.explain_decoded`), so a shard's contents do not depend on the engine
that wrote it. A mask is stored as its float32 little-endian bytes with its shape::

    mask = np.frombuffer(row["mask"], "<f4").reshape(row["mask_shape"])

An image that cannot be read or explained is one row whose ``error`` says why (its other result
columns null); the settings columns are filled on every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import save_png
from ..errors import ImageError, VitExplainError, first_line
from ..outputs import output_stem, overlay
from ..outputs.placement import model_box
from ..pipeline import ExplainSettings, explain_decoded, map_label
from .manifest import DatasetItem
from .sources import require

__all__ = ["COLUMNS", "explain_items", "row_schema", "rows_table"]

#: Column order of every shard (see :func:`row_schema` for the types).
COLUMNS = (
    "path", "image_size", "crop_window", "method", "head_fusion", "discard_ratio", "start_layer", "model_sha256",
    "map", "category_index", "category_name", "top_k", "mask", "mask_shape", "overlay", "error",
)

#: Overlays go under this sub-folder of the output folder, named as the files path names them; the
#: leading underscore keeps pyarrow and pandas from taking it for data when they read the folder.
OVERLAY_DIR = "_overlays"


def row_schema():
    """The pyarrow schema of a shard (``pyarrow`` is the ``[parquet]`` extra)."""
    pa = require("pyarrow", "parquet", "--output-format parquet")
    prediction = pa.struct([("index", pa.int64()), ("name", pa.string()), ("probability", pa.float64())])
    return pa.schema([
        ("path", pa.string()), ("image_size", pa.list_(pa.int32())), ("crop_window", pa.list_(pa.float64())),
        ("method", pa.string()), ("head_fusion", pa.string()), ("discard_ratio", pa.float64()),
        ("start_layer", pa.int32()), ("model_sha256", pa.string()), ("map", pa.string()),
        ("category_index", pa.int64()), ("category_name", pa.string()), ("top_k", pa.list_(prediction)),
        ("mask", pa.binary()), ("mask_shape", pa.list_(pa.int32())), ("overlay", pa.string()), ("error", pa.string()),
    ])


def rows_table(rows: Sequence[dict], metadata: dict[bytes, bytes] | None = None):
    """Rows (dicts with :data:`COLUMNS`) as one pyarrow Table of :func:`row_schema`."""
    pa = require("pyarrow", "parquet", "--output-format parquet")
    schema = row_schema().with_metadata(metadata) if metadata else row_schema()
    return pa.Table.from_pylist(list(rows), schema=schema)


def _settings_columns(item: DatasetItem, settings: ExplainSettings) -> dict:
    recorded = settings.recorded()
    return {"path": item.path, **{key: recorded[key] for key in (
        "method", "head_fusion", "discard_ratio", "start_layer", "model_sha256")}}


def error_row(item: DatasetItem, settings: ExplainSettings, error: str) -> dict:
    """The one row of an image that failed: the settings and why."""
    return {**dict.fromkeys(COLUMNS), **_settings_columns(item, settings), "error": error}


def explain_items(explainer, items: Sequence[DatasetItem], decoded: Sequence[Image.Image | ImageError],
                  settings: ExplainSettings, output_dir: Path | None = None) -> list[list[dict]]:
    """Each item's rows, in their order (an image's maps in category order): one explain step
    over the decoded images, an error row for each that failed. ``output_dir``: write overlays
    (under :data:`OVERLAY_DIR`) and name them in the rows."""
    good = [index for index, image in enumerate(decoded) if not isinstance(image, ImageError)]
    per_item: dict[int, list[dict]] = {
        index: [error_row(items[index], settings, str(image))] for index, image in enumerate(decoded) if index not in good
    }
    if good:
        try:
            per_category, top5 = explain_decoded(explainer, [decoded[i] for i in good], settings)
        except VitExplainError as exc:  # the whole batch failed (never expected): every image says why
            per_item.update({i: [error_row(items[i], settings, first_line(exc))] for i in good})
        else:
            for position, index in enumerate(good):
                per_item[index] = _image_rows(items[index], decoded[index], position, per_category, top5[position],
                                              explainer.metadata, settings, output_dir)
    return [per_item[index] for index in range(len(items))]


def _image_rows(item, image, position, per_category, top5, meta, settings, output_dir) -> list[dict]:
    """One row per map of one image; its overlays written first when asked for."""
    box = model_box(image.size, meta)
    common = {
        **_settings_columns(item, settings),
        "image_size": list(image.size),
        "crop_window": [round(v, 4) for v in box],
        "top_k": [{"index": i, "name": name, "probability": round(p, 6)} for i, name, p in top5],
        "error": None,
    }
    rows = []
    for category, result in per_category:
        label = map_label(settings.method, category, settings.default_target)
        mask = np.ascontiguousarray(result.masks[position], dtype="<f4")
        explained = result.category_index[position] if result.category_index else None
        row = {**common, "map": label, "category_index": explained,
               "category_name": None if explained is None else meta.class_name(explained),
               "mask": mask.tobytes(), "mask_shape": list(mask.shape), "overlay": None}
        if output_dir is not None:
            stem = output_stem(output_dir / OVERLAY_DIR, item.rel)
            target = stem.with_name(f"{stem.name}.{label}.png")
            try:
                save_png(target, overlay(image, mask, settings.colormap, settings.alpha, box))
            except (OSError, ValueError) as exc:  # ValueError: the name would leave the output folder
                reason = getattr(exc, "strerror", None) or exc
                return [error_row(item, settings, f"cannot write the overlay for {item.path}: {reason}")]
            row["overlay"] = target.relative_to(output_dir).as_posix()
        rows.append(row)
    return rows
