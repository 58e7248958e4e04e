"""Tests for vit_explain.outputs.report: the HTML report (rendered in a real browser
when one is installed) and the PNG contact sheet."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_explain.outputs import overlay
from vit_explain.outputs.report import (
    ReportEntry,
    render_contact_sheet,
    render_html_report,
    write_contact_sheet,
    write_html_report,
)

MAGENTA = (255, 0, 255)  # the input thumbnail
ORANGE = (255, 160, 0)  # the first map
CYAN = (0, 200, 255)  # the second image
INJECT_SCRIPT = "evil<script>document.body.innerHTML=''</script>.png"
INJECT_IMG = "<img src=x onerror=\"document.body.style.background='rgb(0,255,0)'\">.jpg"


def _entries() -> list[ReportEntry]:
    """A success with two maps, a failure without thumbnail, and hostile file names."""
    photo = Image.new("RGB", (320, 240), MAGENTA)
    mask = np.zeros((14, 14), np.float32)
    mask[4:9, 4:10] = 1.0
    return [
        ReportEntry(
            source=f"imgs/{INJECT_SCRIPT}",
            image_thumb=photo,
            maps=[("rollout", Image.new("RGB", (320, 240), ORANGE)), ("grad <b>rollout</b>", overlay(photo, mask))],
            predictions=[("tabby cat", 0.873), ("tiger <cat>", 0.05)],
        ),
        ReportEntry(source="imgs/broken.jpg", image_thumb=None, error="cannot identify image <file>"),
        ReportEntry(
            source=INJECT_IMG,
            image_thumb=Image.new("RGBA", (600, 200), CYAN + (255,)),
            maps=[("rollout", Image.new("L", (600, 200), 90))],
            predictions=[("kite", np.float32(0.5))],
        ),
    ]


def _count_near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    """How many pixels are within ``tol`` of ``colour`` on every channel."""
    return int((np.abs(pixels.astype(int) - np.array(colour)).max(axis=-1) <= tol).sum())


def _red_text_pixels(pixels: np.ndarray) -> int:
    p = pixels.astype(int)
    return int(((p[..., 0] > 140) & (p[..., 1] < 60) & (p[..., 2] < 90)).sum())


# =========================================================================== HTML as text


def test_html_is_escaped(tmp_path: Path) -> None:
    page = render_html_report(_entries(), title="Report <script>x()</script>")
    assert "<script>" not in page
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # only escaped occurrences
    assert "&lt;script&gt;" in page
    assert "<b>rollout</b>" not in page and "grad &lt;b&gt;rollout&lt;/b&gt;" in page
    assert "tiger &lt;cat&gt;" in page
    assert "cannot identify image &lt;file&gt;" in page
    assert "<title>Report &lt;script&gt;" in page


def test_html_is_self_contained_with_png_thumbnails() -> None:
    page = render_html_report(_entries(), title="t")
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 5  # 2 inputs with thumbnails + 3 maps
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as thumb:
            assert thumb.format == "PNG" and thumb.width == 160
    assert "http://" not in page and "https://" not in page


def test_html_shows_predictions_and_error_row() -> None:
    page = render_html_report(_entries(), title="t")
    assert "tabby cat <span>87.3%</span>" in page
    assert "kite <span>50.0%</span>" in page
    assert page.count('<tr class="error">') == 1
    assert "3 image(s), 1 failed" in page


def test_write_html_report_is_utf8_file(tmp_path: Path) -> None:
    target = tmp_path / "r" / "report.html"
    entries = [ReportEntry("café/ünïcode.png", Image.new("RGB", (10, 10)), predictions=[("ñandú", 1.0)])]
    write_html_report(target, entries, title="Résumé")
    text = target.read_text(encoding="utf-8")
    assert "ünïcode" in text and "ñandú" in text and '<meta charset="utf-8">' in text


def test_write_html_report_failure_leaves_no_file(tmp_path: Path) -> None:
    # A lazily-opened truncated PNG: it fails only when the report thumbnails it,
    # i.e. halfway through writing the page, after the first row is written.
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), MAGENTA).save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[:-40]))
    target = tmp_path / "report.html"
    good = _entries()[0]
    bad = ReportEntry("x.png", truncated)
    with pytest.raises(OSError, match="truncated"):
        write_html_report(target, [good, bad], title="t")
    assert list(tmp_path.iterdir()) == []

    write_html_report(target, [good], title="old")
    with pytest.raises(OSError):
        write_html_report(target, [good, bad], title="new")
    assert "<title>old</title>" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# =========================================================================== HTML rendered


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _screenshot(browser: str, html_file: Path, tmp_path: Path) -> np.ndarray:
    """Render ``html_file`` with headless Chromium and return the screenshot pixels."""
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        html_file.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc={result.returncode}):\n{result.stderr[-2000:]}"
    with Image.open(shot) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed")
def test_html_report_renders_in_browser(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_html_report(page, _entries(), title="vit-explain report")
    pixels = _screenshot(_chromium() or "", page, tmp_path)

    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20, "screenshot is blank"
    # Thumbnails are 160 px wide: 160x120 for the 4:3 images, 160x53 for the wide one.
    assert _count_near(pixels, MAGENTA) > 0.8 * 160 * 120, "input thumbnail missing"
    assert _count_near(pixels, ORANGE) > 0.8 * 160 * 120, "map thumbnail missing"
    assert _count_near(pixels, CYAN) > 0.8 * 160 * 53, "third row thumbnail missing"
    assert _red_text_pixels(pixels) > 50, "error message is not shown in red"
    # Hostile file names: neither the script nor the onerror handler ran.
    assert _count_near(pixels, (0, 255, 0), tol=5) == 0, "injected onerror handler ran"


# =========================================================================== contact sheet


def test_contact_sheet_layout_and_content(tmp_path: Path) -> None:
    target = tmp_path / "sheet.png"
    returned = write_contact_sheet(target, _entries(), title="sheet")
    with Image.open(target) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == returned.size
        pixels = np.asarray(img)
    width, height = returned.size
    assert width == 8 + 3 * (160 + 8)  # widest row: image + two maps
    assert 120 + 120 + 53 < height < 700
    assert pixels.std() > 20
    assert _count_near(pixels, MAGENTA) >= 160 * 120
    assert _count_near(pixels, ORANGE) >= 160 * 120
    assert _count_near(pixels, CYAN) >= 160 * 53
    assert _red_text_pixels(pixels) > 20, "failed image caption not drawn in red"
    # Captions exist: dark text pixels somewhere in the white space.
    assert _count_near(pixels, (34, 34, 34), tol=40) > 100


def test_contact_sheet_thumbnail_is_where_expected() -> None:
    sheet = np.asarray(render_contact_sheet(_entries()[:1], thumb_width=100))
    # Row header line then the thumbnail: its centre must be the input's colour.
    ys, xs = np.nonzero((np.abs(sheet.astype(int) - MAGENTA).max(axis=-1) == 0))
    assert xs.min() == 8 and xs.max() == 8 + 100 - 1
    assert ys.max() - ys.min() + 1 == 75  # 100 x 75 for a 4:3 image


def test_contact_sheet_limits_rows_and_says_so() -> None:
    many = [ReportEntry(f"img{i}.png", Image.new("RGB", (40, 40), MAGENTA)) for i in range(12)]
    capped = render_contact_sheet(many, max_rows=3)
    full = render_contact_sheet(many, max_rows=None)
    assert capped.height < full.height
    assert _count_near(np.asarray(capped), MAGENTA) == 3 * 160 * 160


def test_contact_sheet_with_no_entries_is_still_an_image(tmp_path: Path) -> None:
    sheet = write_contact_sheet(tmp_path / "empty.png", [], title="nothing")
    assert sheet.width >= 160 and sheet.height > 0
    assert (tmp_path / "empty.png").exists()


def test_contact_sheet_survives_hostile_and_unicode_text() -> None:
    entries = [
        ReportEntry("名前\n<script>.png", Image.new("RGB", (30, 30)), predictions=[("ñandú " * 50, 0.9)]),
        ReportEntry("x" * 500, None, error="e" * 500),
    ]
    sheet = render_contact_sheet(entries)
    assert sheet.width == 320  # one column, widened to the minimum sheet width
    assert _red_text_pixels(np.asarray(sheet)) > 20  # long error line shortened, still drawn
