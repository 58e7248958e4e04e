"""The rows of a run's report: from memory for images explained now, from disk for the rest.

Images done in this run carry a :class:`~vit_explain.pipeline.Preview` (their thumbnails and
JSON record, made while the files were written), so the report reads back nothing the run just
wrote; images skipped as already done (a resumed run) are shown from their files, the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from .errors import ImageError
from .outputs import ReportEntry
from .pipeline import ImageOutcome, Preview, thumbnail
from .runtime.images import load_image

__all__ = ["report_entries"]


def report_entries(outcomes: Sequence[ImageOutcome], limit: int = 1000, report_dir: Path | None = None) -> list[ReportEntry]:
    """Report rows for ``outcomes`` (at most ``limit``: a report of a huge run stays viewable).

    ``report_dir``: where the report will be, so that each map links to its full-size overlay
    (and the source to the photo) by a relative path, which survives moving the whole folder.
    """
    entries = []
    for outcome in outcomes[:limit]:
        source = str(outcome.item.path)
        if outcome.status == "failed":
            entries.append(ReportEntry(source, None, error=outcome.error))
            continue
        try:
            preview = outcome.preview or _preview_from_disk(outcome)
            entries.append(_report_entry(outcome, preview, source, report_dir))
        except (OSError, ValueError, KeyError, ImageError) as exc:
            entries.append(ReportEntry(source, None, error=f"cannot show outputs: {exc}"))
    return entries


def _preview_from_disk(outcome: ImageOutcome) -> Preview:
    """What :func:`~vit_explain.pipeline.explain_images` keeps in memory, rebuilt from the files
    of an image an earlier run explained. Thumbnails are made one image at a time."""
    thumb = thumbnail(load_image(outcome.item.path))
    record = json.loads(outcome.files["json"].read_text(encoding="utf-8")) if "json" in outcome.files else {}
    overlays = {}
    for key, path in outcome.files.items():
        if key.endswith(".png"):
            with Image.open(path) as overlay_image:
                overlays[key.removesuffix(".png")] = thumbnail(overlay_image.convert("RGB"))
    return Preview(thumb, overlays, record)


def _href(path: Path, report_dir: Path) -> str:
    """``path`` as a link from a page in ``report_dir``: relative and URL-quoted (``#`` or a space
    in a file name must not cut the link), or a ``file:`` URI where no relative path exists."""
    try:
        return quote(Path(os.path.relpath(Path(path).resolve(), Path(report_dir).resolve())).as_posix())
    except ValueError:  # another drive (Windows)
        return Path(path).resolve().as_uri()


def _map_caption(label: str, recorded: dict) -> str:
    """``"grad_rollout: bull mastiff"`` for the file label ``grad_rollout.243``: people read class
    names, not indices (the index stays in the file name and the JSON)."""
    method = label.split(".", 1)[0]
    if recorded.get("category_name"):
        return f"{method}: {recorded['category_name']}"
    if label.endswith(".features"):
        return f"{method}: own features"
    return label


def _report_entry(outcome: ImageOutcome, preview: Preview, source: str, report_dir: Path | None) -> ReportEntry:
    recorded = {m.get("label"): m for m in preview.record.get("maps", [])}
    maps, links = [], {}
    if report_dir is not None:
        links["source"] = _href(outcome.item.path, report_dir)
    for key, path in outcome.files.items():
        if key.endswith(".png"):
            label = key.removesuffix(".png")
            caption = _map_caption(label, recorded.get(label, {}))
            maps.append((caption, preview.overlays[label]))
            if report_dir is not None:
                links[caption] = _href(path, report_dir)
    predictions = [(p["name"], float(p["probability"])) for p in preview.record.get("predictions", [])[:3]]
    return ReportEntry(source, preview.thumb, maps=maps, predictions=predictions, links=links)
