"""Summaries of a batch run: one self-contained HTML page and PNG contact sheets.

The HTML report embeds every thumbnail as a base64 data URI so that it can be
mailed or copied as a single file (links to the full-size overlays work while it
sits in the output folder); text from users (file names, labels, error messages)
is HTML-escaped, because a file called ``<script>.png`` must not run code in
whoever opens the report. A report says which model and settings made the maps,
warns loudly when the model's weights are random (its maps explain nothing about
the photos), and shows the colour scale. The contact sheet (:mod:`.contact_sheet`) is
the same information as plain PNG pages.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..atomic import atomic_writer

__all__ = [
    "ReportContext",
    "ReportEntry",
    "render_html_report",
    "write_html_report",
    "colour_bar",
    "top1_text",
]

THUMB_WIDTH = 160


@dataclass
class ReportEntry:
    """One input image in a report.

    ``source`` is the path as the user gave it; ``maps`` are (label, overlay image)
    pairs; ``predictions`` are the top (class name, probability) pairs, best first.
    A failed image has ``error`` set; its ``image_thumb`` may be None if it could
    not even be read.
    """

    source: str
    image_thumb: Image.Image | None
    maps: list[tuple[str, Image.Image]] = field(default_factory=list)
    predictions: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    links: dict[str, str] = field(default_factory=dict)  # map label (or "source") -> href of the full-size file


@dataclass(frozen=True)
class ReportContext:
    """What made the maps, shown above them: a map means little without its model and settings.

    ``weights`` is the model metadata's (``"random(seed=0)"``, ``"pretrained"``, a file name);
    ``settings`` are (name, value) pairs shown in order; ``has_classifier`` False (a feature
    model) shows "no classifier head" where a classifier's predictions would be.
    """

    model: str
    weights: str
    settings: tuple[tuple[str, str], ...] = ()
    colormap: str = "jet"
    has_classifier: bool = True

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _thumbnail(image: Image.Image, width: int) -> Image.Image:
    """An RGB copy exactly ``width`` pixels wide (aspect kept), scaled up or down so
    that columns line up in the report and the contact sheet."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    height = max(1, round(rgb.height * width / max(1, rgb.width)))
    return rgb.resize((width, height), Image.Resampling.LANCZOS)


def top1_text(entry: ReportEntry) -> str:
    """``"tabby cat 87.3%"`` for the best prediction, or "" when there is none."""
    if not entry.predictions:
        return ""
    name, prob = entry.predictions[0]
    return f"{name} {_percent(prob)}"


def _percent(prob: float) -> str:
    return f"{100.0 * float(prob):.1f}%"


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 4px 0; }
p.summary { color: #666; margin: 0 0 16px 0; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 8px; vertical-align: top; text-align: left; }
th { background: #f0f0f0; font-weight: 600; }
td.source { max-width: 220px; word-break: break-all; font-family: ui-monospace, monospace; font-size: 0.9em; }
.maps { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; }
figcaption { font-size: 0.8em; color: #555; text-align: center; }
img { display: block; }
ol.preds { margin: 0; padding-left: 1.4em; font-size: 0.9em; }
ol.preds li:first-child { font-weight: 600; }
tr.error td { background: #fdecea; }
td.error { color: #b00020; font-weight: 600; }
td.none { color: #888; font-style: italic; }
.badge { display: inline-block; background: #b00020; color: #fff; font-weight: 700;
         padding: 4px 10px; border-radius: 4px; margin: 4px 0 8px 0; }
table.settings { margin: 0 0 12px 0; font-size: 0.9em; }
table.settings th, table.settings td { padding: 3px 10px; }
.colourbar { display: flex; align-items: center; gap: 8px; margin: 0 0 16px 0; font-size: 0.85em; color: #555; }
.colourbar img { border: 1px solid #999; }
a img { border: 1px solid transparent; }
a:hover img { border-color: #1a5fb4; }
""".strip()


def _data_uri(image: Image.Image, width: int = THUMB_WIDTH) -> str:
    """A PNG thumbnail as a ``data:`` URI, so the report is a single file."""
    buf = io.BytesIO()
    _thumbnail(image, width).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(image: Image.Image, alt: str) -> str:
    return f'<img src="{_data_uri(image)}" width="{THUMB_WIDTH}" alt="{html.escape(alt)}">'


def _linked(tag: str, href: str | None) -> str:
    """``tag`` wrapped in a link to ``href`` (a relative path or URI), opening in a new tab."""
    if not href:
        return tag
    return f'<a href="{html.escape(href)}" target="_blank" rel="noopener">{tag}</a>'


def _figure(image: Image.Image, label: str, href: str | None = None) -> str:
    return f"<figure>{_linked(_img_tag(image, label), href)}<figcaption>{html.escape(label)}</figcaption></figure>"


def _predictions_html(predictions: Sequence[tuple[str, float]], has_classifier: bool = True) -> str:
    if not has_classifier:
        return "no classifier head"
    if not predictions:
        return ""
    items = "".join(f"<li>{html.escape(str(n))} <span>{_percent(p)}</span></li>" for n, p in predictions)
    return f'<ol class="preds">{items}</ol>'


def _row_html(entry: ReportEntry, has_classifier: bool = True) -> str:
    """One table row; failed images get a red row carrying the error message."""
    source = f'<td class="source">{_linked(html.escape(entry.source), entry.links.get("source"))}</td>'
    thumb = _img_tag(entry.image_thumb, entry.source) if entry.image_thumb is not None else ""
    if entry.error is not None:
        return (
            f'<tr class="error">{source}<td>{thumb}</td>'
            f'<td class="error" colspan="2">{html.escape(entry.error)}</td></tr>\n'
        )
    maps = "".join(_figure(img, label, entry.links.get(label)) for label, img in entry.maps)
    cell_class = "" if has_classifier else ' class="none"'
    predictions = f"<td{cell_class}>{_predictions_html(entry.predictions, has_classifier)}</td>"
    return f"<tr>{source}<td>{thumb}</td><td><div class=\"maps\">{maps}</div></td>{predictions}</tr>\n"


def colour_bar(colormap: str, width: int = 256, height: int = 14) -> Image.Image:
    """The colormap from 0 (left) to 1 (right), as the overlays paint a mask scaled to max 1."""
    from .overlay import colorize  # matplotlib is imported only when a colour bar is drawn

    ramp = np.repeat(np.linspace(0.0, 1.0, width, dtype=np.float32)[None], height, axis=0)
    return Image.fromarray(colorize(ramp, colormap))


def _context_html(context: ReportContext) -> str:
    """The badge (random weights), the model and settings table and the colour bar."""
    parts = []
    if context.random_weights:
        parts.append(
            f'<div class="badge">RANDOM WEIGHTS ({html.escape(context.weights)}): an untrained model; '
            "these maps say nothing about the photos</div>"
        )
    rows = [("model", context.model), ("weights", context.weights), *context.settings]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    parts.append(f'<table class="settings">{cells}</table>')
    bar = colour_bar(context.colormap)
    buf = io.BytesIO()
    bar.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    parts.append(
        f'<div class="colourbar"><span>0 (least relevant)</span><img src="{uri}" width="{bar.width}" '
        f'height="{bar.height}" alt="colour bar: {html.escape(context.colormap)}"><span>1 (most relevant; '
        f"each map is scaled to max 1, colormap {html.escape(context.colormap)})</span></div>"
    )
    return "\n".join(parts) + "\n"


def _iter_html(entries: Sequence[ReportEntry], title: str, context: ReportContext | None = None) -> Iterator[str]:
    """The page in chunks, one per row, so large batches never sit in memory as one string."""
    failed = sum(e.error is not None for e in entries)
    summary = f"{len(entries)} image(s)" + (f", {failed} failed" if failed else "")
    has_classifier = context is None or context.has_classifier
    yield (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"summary\">{html.escape(summary)}</p>\n"
        + (_context_html(context) if context is not None else "")
        + "<table>\n<tr><th>Source</th><th>Image</th><th>Explanations (click for full size)</th>"
        "<th>Top predictions</th></tr>\n"
    )
    for entry in entries:
        yield _row_html(entry, has_classifier)
    yield "</table>\n</body>\n</html>\n"


def render_html_report(entries: Sequence[ReportEntry], title: str, context: ReportContext | None = None) -> str:
    """The report as an HTML string (see :func:`write_html_report`)."""
    return "".join(_iter_html(entries, title, context))


def write_html_report(
    path: str | os.PathLike[str], entries: Sequence[ReportEntry], title: str, context: ReportContext | None = None
) -> None:
    """Write a self-contained HTML report atomically: one row per image, in the order given."""
    with atomic_writer(path, "w") as f:
        for chunk in _iter_html(entries, title, context):
            f.write(chunk)
