"""Summaries of a batch run: one self-contained HTML page and PNG contact sheets.

The HTML report embeds every thumbnail as a base64 data URI so that it can be
mailed or copied as a single file (links to the full-size overlays work while it
sits in the output folder); text from users (file names, labels, error messages)
is HTML-escaped, because a file called ``<script>.png`` must not run code in
whoever opens the report. A report says which model and settings made the maps,
warns loudly when the model's weights are random (its maps explain nothing about
the photos), and shows the colour scale. The contact sheet is the same information
as a plain image: a grid of tiles, cut into pages so that hundreds of images make
several sheets of a viewable size rather than one strip thousands of pixels tall.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_writer, save_png

__all__ = [
    "ReportContext",
    "ReportEntry",
    "render_html_report",
    "write_html_report",
    "colour_bar",
    "page_path",
    "render_contact_sheet",
    "render_contact_sheets",
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
td.none { color: #888; font-style: italic; }
.badge { display: inline-block; background: #b00020; color: #fff; font-weight: 700; padding: 4px 10px; border-radius: 4px; margin: 4px 0 8px 0; }
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


#: Tiles per sheet and the widest sheet: 120 images with one map each make three sheets of
#: about 1400 x 1500 px (five tiles a row), not one 344 x 18000 px strip.
TILES_PER_PAGE = 40
MAX_SHEET_WIDTH = 1400
SHEET_THUMB = 128
_GAP = 4


def _fit_box(image: Image.Image, box: int) -> Image.Image:
    """An RGB copy that fits a ``box`` x ``box`` square (aspect kept): a portrait photo must not
    make its whole grid row four times as tall."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    scale = box / max(1, rgb.width, rgb.height)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.LANCZOS)


@dataclass
class _Tile:
    """One image's tile: its thumbnail then its maps side by side, each with a label, and two
    caption lines under them (the file, then the top-1 prediction or the error in red)."""

    cells: list[tuple[Image.Image, str]]
    name: str
    detail: str
    detail_colour: tuple[int, int, int]

    def width(self, thumb: int) -> int:
        return max(1, len(self.cells)) * (thumb + _GAP) - _GAP


def _make_tile(entry: ReportEntry, thumb: int, has_classifier: bool) -> _Tile:
    cells: list[tuple[Image.Image, str]] = []
    if entry.image_thumb is not None:
        cells.append((_fit_box(entry.image_thumb, thumb), "image"))
    if entry.error is not None:
        return _Tile(cells, entry.source, entry.error, _RED)
    cells += [(_fit_box(img, thumb), label) for label, img in entry.maps]
    detail = _top1(entry) if has_classifier else "no classifier head"
    return _Tile(cells, entry.source, detail, _TEXT)


def _page_header(draw, sheet_width, title, context, font, line_h) -> int:
    """Title, random-weights warning and colour bar; returns the y below them."""
    y = _PAD
    if title:
        draw.text((_PAD, y), _fit(draw, title, font, sheet_width - 2 * _PAD), fill=_TEXT, font=font)
        y += line_h
    if context is not None and context.random_weights:
        warning = f"RANDOM WEIGHTS ({context.weights}): an untrained model; these maps say nothing about the photos"
        draw.text((_PAD, y), _fit(draw, warning, font, sheet_width - 2 * _PAD), fill=_RED, font=font)
        y += line_h
    return y


def _draw_colour_bar(sheet: Image.Image, draw, y: int, colormap: str, font, line_h: int) -> int:
    low = "0"
    draw.text((_PAD, y), low, fill=_TEXT, font=font)
    x = _PAD + int(draw.textlength(low, font=font)) + 6
    bar = colour_bar(colormap, width=200, height=_FONT_SIZE)
    sheet.paste(bar, (x, y + 2))
    draw.text((x + bar.width + 6, y), f"1 (most relevant, colormap {colormap})", fill=_TEXT, font=font)
    return y + line_h


def _render_page(
    tiles: Sequence[_Tile], *, title: str | None, context: ReportContext | None, thumb: int, note: str | None
) -> Image.Image:
    font = _font()
    line_h = _FONT_SIZE + 6
    tile_w = max([t.width(thumb) for t in tiles] + [thumb])
    per_row = max(1, (MAX_SHEET_WIDTH - _PAD) // (tile_w + 2 * _PAD))
    rows = [list(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
    width = max(_PAD + min(per_row, max(1, len(tiles))) * (tile_w + 2 * _PAD), 320)
    header_h = _PAD + (line_h if title else 0) + (line_h if context is not None and context.random_weights else 0)
    header_h += line_h if context is not None else 0
    row_heights = [max((img.height for t in row for img, _ in t.cells), default=0) + 3 * line_h for row in rows]
    height = header_h + sum(h + 2 * _PAD for h in row_heights) + (line_h + _PAD if note else 0) + _PAD

    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = _page_header(draw, width, title, context, font, line_h)
    if context is not None:
        y = _draw_colour_bar(sheet, draw, y, context.colormap, font, line_h)
    y += _PAD
    for row, row_h in zip(rows, row_heights):
        images_h = row_h - 3 * line_h
        for col, tile in enumerate(row):
            x0 = _PAD + col * (tile_w + 2 * _PAD)
            for i, (img, label) in enumerate(tile.cells):
                x = x0 + i * (thumb + _GAP)
                sheet.paste(img, (x, y))
                draw.text((x, y + images_h + 2), _fit(draw, label, font, thumb), fill=_TEXT, font=font)
            draw.text((x0, y + images_h + line_h), _fit(draw, tile.name, font, tile_w), fill=_TEXT, font=font)
            colour = tile.detail_colour
            draw.text((x0, y + images_h + 2 * line_h), _fit(draw, tile.detail, font, tile_w), fill=colour, font=font)
        y += row_h + 2 * _PAD
    if note:
        draw.text((_PAD, y), _fit(draw, note, font, width - 2 * _PAD), fill=_TEXT, font=font)
    return sheet


def render_contact_sheets(
    entries: Sequence[ReportEntry],
    *,
    title: str | None = None,
    context: ReportContext | None = None,
    thumb_width: int = SHEET_THUMB,
    per_page: int = TILES_PER_PAGE,
) -> list[Image.Image]:
    """Grid pages of at most ``per_page`` tiles, in the order given; always at least one page.

    Each page is at most :data:`MAX_SHEET_WIDTH` wide (a tile wider than that: one tile a row)
    and carries the title, the random-weights warning and the colour bar, so a page read on
    its own is not misread. Thumbnails fit a ``thumb_width`` square.
    """
    if per_page < 1:
        raise ValueError(f"per_page must be at least 1, not {per_page}")
    has_classifier = context is None or context.has_classifier
    pages = [entries[i : i + per_page] for i in range(0, len(entries), per_page)] or [[]]
    sheets = []
    for number, page in enumerate(pages, start=1):
        tiles = [_make_tile(e, thumb_width, has_classifier) for e in page]
        page_title = title if len(pages) == 1 or title is None else f"{title} (page {number} of {len(pages)})"
        note = "no images" if not tiles else None
        if len(pages) > 1 and number < len(pages):
            note = f"continued on page {number + 1}"
        sheets.append(_render_page(tiles, title=page_title, context=context, thumb=thumb_width, note=note))
    return sheets


def render_contact_sheet(
    entries: Sequence[ReportEntry],
    *,
    title: str | None = None,
    context: ReportContext | None = None,
    thumb_width: int = SHEET_THUMB,
    per_page: int = TILES_PER_PAGE,
) -> Image.Image:
    """The first page of :func:`render_contact_sheets`."""
    return render_contact_sheets(entries[:per_page], title=title, context=context, thumb_width=thumb_width, per_page=per_page)[0]


def page_path(path: Path, number: int) -> Path:
    """``contact_sheet.png`` for page 1, then ``contact_sheet-2.png``, ``contact_sheet-3.png``..."""
    return path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def _stale_pages(path: Path, pages: int) -> list[Path]:
    """Pages a previous, longer run left behind (``<stem>-N<suffix>`` with N > ``pages``)."""
    pattern = re.compile(re.escape(path.stem) + r"-([0-9]+)" + re.escape(path.suffix) + "$")
    stale = []
    for candidate in path.parent.glob(f"{path.stem}-*{path.suffix}"):
        found = pattern.match(candidate.name)
        if found and int(found.group(1)) > pages and candidate.is_file():
            stale.append(candidate)
    return sorted(stale)


def write_contact_sheet(
    path: str | os.PathLike[str],
    entries: Sequence[ReportEntry],
    *,
    title: str | None = None,
    context: ReportContext | None = None,
    thumb_width: int = SHEET_THUMB,
    per_page: int = TILES_PER_PAGE,
) -> list[Path]:
    """Render :func:`render_contact_sheets` and save each page as PNG atomically (see
    :func:`page_path`); a previous run's extra pages are removed so none is mistaken for this
    run's. Returns the pages' paths."""
    path = Path(path)
    sheets = render_contact_sheets(entries, title=title, context=context, thumb_width=thumb_width, per_page=per_page)
    written = []
    for number, sheet in enumerate(sheets, start=1):
        written.append(page_path(path, number))
        save_png(written[-1], sheet)
    for stale in _stale_pages(path, len(sheets)):
        stale.unlink(missing_ok=True)
    return written
