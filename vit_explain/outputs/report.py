"""Summaries of a batch run: one self-contained HTML page and one PNG contact sheet.

The HTML report embeds every thumbnail as a base64 data URI so that it can be
mailed or copied as a single file; text from users (file names, labels, error
messages) is HTML-escaped, because a file called ``<script>.png`` must not run
code in whoever opens the report. The contact sheet is the same information as a
plain image, for people and tools that prefer one.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from .files import atomic_writer, save_png

__all__ = [
    "ReportEntry",
    "render_html_report",
    "write_html_report",
    "render_contact_sheet",
    "write_contact_sheet",
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


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _thumbnail(image: Image.Image, width: int) -> Image.Image:
    """An RGB copy exactly ``width`` pixels wide (aspect kept), scaled up or down so
    that columns line up in the report and the contact sheet."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    height = max(1, round(rgb.height * width / max(1, rgb.width)))
    return rgb.resize((width, height), Image.Resampling.LANCZOS)


def _top1(entry: ReportEntry) -> str:
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
""".strip()


def _data_uri(image: Image.Image, width: int = THUMB_WIDTH) -> str:
    """A PNG thumbnail as a ``data:`` URI, so the report is a single file."""
    buf = io.BytesIO()
    _thumbnail(image, width).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(image: Image.Image, alt: str) -> str:
    return f'<img src="{_data_uri(image)}" width="{THUMB_WIDTH}" alt="{html.escape(alt)}">'


def _figure(image: Image.Image, label: str) -> str:
    return f"<figure>{_img_tag(image, label)}<figcaption>{html.escape(label)}</figcaption></figure>"


def _predictions_html(predictions: Sequence[tuple[str, float]]) -> str:
    if not predictions:
        return ""
    items = "".join(f"<li>{html.escape(str(n))} <span>{_percent(p)}</span></li>" for n, p in predictions)
    return f'<ol class="preds">{items}</ol>'


def _row_html(entry: ReportEntry) -> str:
    """One table row; failed images get a red row carrying the error message."""
    source = f'<td class="source">{html.escape(entry.source)}</td>'
    thumb = _img_tag(entry.image_thumb, entry.source) if entry.image_thumb is not None else ""
    if entry.error is not None:
        return (
            f'<tr class="error">{source}<td>{thumb}</td>'
            f'<td class="error" colspan="2">{html.escape(entry.error)}</td></tr>\n'
        )
    maps = "".join(_figure(img, label) for label, img in entry.maps)
    return (
        f"<tr>{source}<td>{thumb}</td><td><div class=\"maps\">{maps}</div></td>"
        f"<td>{_predictions_html(entry.predictions)}</td></tr>\n"
    )


def _iter_html(entries: Sequence[ReportEntry], title: str) -> Iterator[str]:
    """The page in chunks, one per row, so large batches never sit in memory as one string."""
    failed = sum(e.error is not None for e in entries)
    summary = f"{len(entries)} image(s)" + (f", {failed} failed" if failed else "")
    yield (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"summary\">{html.escape(summary)}</p>\n"
        "<table>\n<tr><th>Source</th><th>Image</th><th>Explanations</th><th>Top predictions</th></tr>\n"
    )
    for entry in entries:
        yield _row_html(entry)
    yield "</table>\n</body>\n</html>\n"


def render_html_report(entries: Sequence[ReportEntry], title: str) -> str:
    """The report as an HTML string (see :func:`write_html_report`)."""
    return "".join(_iter_html(entries, title))


def write_html_report(path: str | os.PathLike[str], entries: Sequence[ReportEntry], title: str) -> None:
    """Write a self-contained HTML report atomically: one row per image."""
    with atomic_writer(path, "w") as f:
        for chunk in _iter_html(entries, title):
            f.write(chunk)


# --------------------------------------------------------------------------- #
# Contact sheet
# --------------------------------------------------------------------------- #

_PAD = 8
_FONT_SIZE = 12
_TEXT = (34, 34, 34)
_RED = (176, 0, 32)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font: no font files to ship or find."""
    return ImageFont.load_default(size=_FONT_SIZE)


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """Bitmap fallback fonts only know Latin-1; replace what they cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: int
) -> str:
    """Shorten ``text`` from the left ("...") until it fits ``max_width`` pixels.

    Captions are "<path> - <top-1>" or "<path>: <error>": the file name and what follows it
    matter most, while a long absolute path's leading folders matter least.
    """
    text = _drawable(text.replace("\n", " "), font)
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength("..." + text, font=font) > max_width:
        text = text[1:]
    return "..." + text


@dataclass
class _Row:
    """A laid-out contact-sheet row: thumbnails with captions, plus the row header."""

    header: str
    header_colour: tuple[int, int, int]
    cells: list[tuple[Image.Image, str]]

    @property
    def image_height(self) -> int:
        return max((img.height for img, _ in self.cells), default=0)


def _make_row(entry: ReportEntry, width: int) -> _Row:
    cells: list[tuple[Image.Image, str]] = []
    if entry.image_thumb is not None:
        cells.append((_thumbnail(entry.image_thumb, width), "image"))
    if entry.error is not None:
        return _Row(f"{entry.source}: {entry.error}", _RED, cells)
    cells += [(_thumbnail(img, width), label) for label, img in entry.maps]
    top1 = _top1(entry)
    return _Row(f"{entry.source}" + (f" - {top1}" if top1 else ""), _TEXT, cells)


def render_contact_sheet(
    entries: Sequence[ReportEntry],
    *,
    title: str | None = None,
    thumb_width: int = THUMB_WIDTH,
    max_rows: int | None = 250,
) -> Image.Image:
    """A grid image: one row per entry (image then its maps), with a caption line
    naming the source and its top-1 prediction (or its error, in red).

    ``max_rows`` bounds memory for huge batches; the omitted count is written at the end.
    """
    font = _font()
    line_h = _FONT_SIZE + 6
    shown = list(entries if max_rows is None else entries[:max_rows])
    rows = [_make_row(e, thumb_width) for e in shown]
    omitted = len(entries) - len(shown)
    columns = max([len(r.cells) for r in rows] + [1])
    width = max(_PAD + columns * (thumb_width + _PAD), 320)
    height = _PAD + (line_h if title else 0) + (line_h if omitted or not rows else 0)
    height += sum(line_h + r.image_height + line_h + _PAD for r in rows)

    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = _PAD
    if title:
        draw.text((_PAD, y), _fit(draw, title, font, width - 2 * _PAD), fill=_TEXT, font=font)
        y += line_h
    for row in rows:
        draw.text((_PAD, y), _fit(draw, row.header, font, width - 2 * _PAD), fill=row.header_colour, font=font)
        y += line_h
        for i, (img, label) in enumerate(row.cells):
            x = _PAD + i * (thumb_width + _PAD)
            sheet.paste(img, (x, y))
            draw.text((x, y + row.image_height + 2), _fit(draw, label, font, thumb_width), fill=_TEXT, font=font)
        y += row.image_height + line_h + _PAD
    if omitted or not rows:
        note = f"... and {omitted} more (see the HTML report)" if omitted else "no images"
        draw.text((_PAD, y), _fit(draw, note, font, width - 2 * _PAD), fill=_TEXT, font=font)
    return sheet


def write_contact_sheet(
    path: str | os.PathLike[str],
    entries: Sequence[ReportEntry],
    *,
    title: str | None = None,
    thumb_width: int = THUMB_WIDTH,
    max_rows: int | None = 250,
) -> Image.Image:
    """Render :func:`render_contact_sheet` and save it as PNG atomically; returns the image."""
    sheet = render_contact_sheet(entries, title=title, thumb_width=thumb_width, max_rows=max_rows)
    save_png(path, sheet)
    return sheet
