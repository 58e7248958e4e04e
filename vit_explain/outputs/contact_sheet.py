"""Contact sheets: a run's report as plain PNG pages, for viewers that show no HTML.

The same information as :mod:`.report`'s page (model, settings, random-weights warning, colour
bar, a tile per image), laid out as a grid and cut into pages of a viewable size, so hundreds of
images make several sheets rather than one strip thousands of pixels tall. Stale pages of an
earlier, longer run are removed, so the folder never mixes two runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import save_png
from .report import ReportContext, ReportEntry, colour_bar, top1_text

__all__ = ["page_path", "render_contact_sheet", "render_contact_sheets", "write_contact_sheet"]


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
    detail = top1_text(entry) if has_classifier else "no classifier head"
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
    for row, row_h in zip(rows, row_heights, strict=True):
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
