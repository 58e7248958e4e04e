"""Tests for vit_explain.outputs.report: the HTML report (rendered in a real browser
when one is installed) and the PNG contact sheet."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_explain.outputs import overlay
from vit_explain.outputs.contact_sheet import render_contact_sheet, write_contact_sheet
from vit_explain.outputs.report import ReportEntry, render_html_report, write_html_report

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
    written = write_contact_sheet(target, _entries(), title="sheet", thumb_width=160)
    assert written == [target]
    with Image.open(target) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        pixels = np.asarray(img)
    height, width = pixels.shape[:2]
    assert width <= 1400  # the three tiles (widest: image + two maps) share one grid row
    assert 120 < height < 400
    assert pixels.std() > 20
    assert _count_near(pixels, MAGENTA) >= 160 * 120
    assert _count_near(pixels, ORANGE) >= 160 * 120
    assert _count_near(pixels, CYAN) >= 160 * 53
    assert _red_text_pixels(pixels) > 20, "failed image caption not drawn in red"
    # Captions exist: dark text pixels somewhere in the white space.
    assert _count_near(pixels, (34, 34, 34), tol=40) > 100


def test_contact_sheet_thumbnail_is_where_expected() -> None:
    sheet = np.asarray(render_contact_sheet(_entries()[:1], thumb_width=100))
    # Header line then the thumbnail: its centre must be the input's colour.
    ys, xs = np.nonzero(np.abs(sheet.astype(int) - MAGENTA).max(axis=-1) == 0)
    assert xs.min() == 8 and xs.max() == 8 + 100 - 1
    assert ys.max() - ys.min() + 1 == 75  # 100 x 75 for a 4:3 image


def test_contact_sheet_portrait_photo_fits_its_box() -> None:
    tall = [ReportEntry("tall.png", Image.new("RGB", (100, 400), MAGENTA))]
    sheet = np.asarray(render_contact_sheet(tall, thumb_width=128))
    ys, xs = np.nonzero(np.abs(sheet.astype(int) - MAGENTA).max(axis=-1) == 0)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (128, 32)


def _many(count: int) -> list[ReportEntry]:
    photo = Image.new("RGB", (224, 224), MAGENTA)
    return [ReportEntry(f"photos/img{i:03d}.png", photo, maps=[("rollout", Image.new("RGB", (224, 224), ORANGE))],
                        predictions=[("kite", 0.5)]) for i in range(count)]


def test_contact_sheets_for_120_images_are_pages_of_a_sensible_size(tmp_path: Path) -> None:
    target = tmp_path / "contact_sheet.png"
    written = write_contact_sheet(target, _many(120), title="run")
    assert [p.name for p in written] == ["contact_sheet.png", "contact_sheet-2.png", "contact_sheet-3.png"]
    thumbs = 0
    for path in written:
        with Image.open(path) as img:
            assert img.width <= 1400 and img.height <= 2000, img.size
            assert img.width >= 4 * img.height / 3 / 2, f"{img.size}: a strip, not a grid"
            thumbs += _count_near(np.asarray(img), MAGENTA) // (128 * 128)
    assert thumbs == 120  # every image on some page, none twice

    # A shorter rerun removes the pages it no longer has, so no stale page is read as this run's.
    assert write_contact_sheet(target, _many(3), title="run") == [target]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contact_sheet.png"]


def test_contact_sheet_with_no_entries_is_still_an_image(tmp_path: Path) -> None:
    written = write_contact_sheet(tmp_path / "empty.png", [], title="nothing")
    with Image.open(written[0]) as sheet:
        assert sheet.width >= 160 and sheet.height > 0


def test_contact_sheet_survives_hostile_and_unicode_text() -> None:
    entries = [
        ReportEntry("名前\n<script>.png", Image.new("RGB", (30, 30)), predictions=[("ñandú " * 50, 0.9)]),
        ReportEntry("x" * 500, None, error="e" * 500),
    ]
    sheet = render_contact_sheet(entries)
    assert sheet.width <= 1400
    assert _red_text_pixels(np.asarray(sheet)) > 20  # long error line shortened, still drawn


# =========================================================================== what made the maps


def _context(weights: str = "random(seed=0)", has_classifier: bool = True):
    from vit_explain.outputs.report import ReportContext

    settings = (("method", "grad_rollout"), ("head fusion", "mean"), ("discard ratio", "0.9"))
    return ReportContext("deit_tiny_patch16_224", weights, settings, "viridis", has_classifier)


def test_html_shows_model_settings_random_badge_and_colour_bar() -> None:
    page = render_html_report(_entries(), title="t", context=_context())
    assert 'class="badge">RANDOM WEIGHTS (random(seed=0))' in page
    assert "<th>model</th><td>deit_tiny_patch16_224</td>" in page
    assert "<th>head fusion</th><td>mean</td>" in page and "<th>discard ratio</th><td>0.9</td>" in page
    bar = re.search(r'<img src="data:image/png;base64,([^"]*)" width="256" height="14" alt="colour bar: viridis"', page)
    assert bar is not None
    with Image.open(io.BytesIO(base64.b64decode(bar.group(1)))) as img:
        row = np.asarray(img.convert("RGB"))[7].astype(int)
    assert tuple(row[0]) == (68, 1, 84) and tuple(row[-1]) == (253, 231, 36)  # viridis(0) left, viridis(1) right
    assert "badge" not in render_html_report(_entries(), title="t", context=_context("pretrained")).split("</style>")[1]


def test_html_of_a_feature_model_says_no_classifier_head() -> None:
    entries = [e for e in _entries() if e.error is None]
    page = render_html_report(entries, title="t", context=_context(has_classifier=False))
    assert page.count('<td class="none">no classifier head</td>') == 2
    assert "tabby cat" not in page


def test_html_links_maps_and_source_to_their_files() -> None:
    entry = _entries()[0]
    entry.links = {"rollout": "img%20s/a.rollout.png", "source": "../in/a.png", "grad <b>rollout</b>": 'x".png'}
    page = render_html_report([entry], title="t")
    assert '<a href="img%20s/a.rollout.png" target="_blank" rel="noopener"><img' in page
    assert '<a href="../in/a.png" target="_blank" rel="noopener">imgs/evil&lt;script&gt;' in page
    assert '<a href="x&quot;.png"' in page  # an href cannot break out of its attribute


def test_contact_sheet_warns_about_random_weights() -> None:
    plain = np.asarray(render_contact_sheet(_entries()[:1], title="t", context=_context("pretrained")))
    warned = np.asarray(render_contact_sheet(_entries()[:1], title="t", context=_context()))
    assert _red_text_pixels(warned) > _red_text_pixels(plain) + 100


# =========================================================================== through the CLI


def _cli(*args):
    from click.testing import CliRunner

    from vit_explain.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 72), Image.Resampling.BILINEAR).save(path)
    return path


@pytest.mark.slow
def test_cli_report_names_classes_links_overlays_and_keeps_input_order(export_family, tmp_path: Path) -> None:
    model = export_family("deit").path
    a, b, c = (_photo(tmp_path / "in" / f"{n}.png", i) for i, n in enumerate("abc"))
    out = tmp_path / "out"
    assert _cli("explain", b, "--model", model, "-o", out, "--category-index", "7", "-q").exit_code == 0
    result = _cli("explain", c, b, a, "--model", model, "-o", out, "--category-index", "7", "--report", "-q")
    assert result.exit_code == 0, result.output
    html_text = (out / "report.html").read_text(encoding="utf-8")
    rows = [html_text.index(f'{p}</a></td>') for p in (c, b, a)]
    assert rows == sorted(rows), "rows not in input order (b was skipped, so it came first)"
    name = html.escape(export_family("deit").metadata.class_name(7))
    assert f"<figcaption>grad_rollout: {name}</figcaption>" in html_text and "grad_rollout.7<" not in html_text
    assert "RANDOM WEIGHTS" in html_text and "<th>discard ratio</th><td>0.9</td>" in html_text
    links = re.findall(r'<a href="([^"]*\.png)"', html_text)
    assert len(links) == 6  # each source and each overlay
    for link in links:
        assert (out / link).resolve().is_file(), link


@pytest.mark.slow
def test_cli_report_that_cannot_be_written_is_one_error_line(export_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "report.html").mkdir(parents=True)  # something in the way of the report
    result = _cli("explain", _photo(tmp_path / "a.png", 0), "--model", export_family("deit").path, "-o", out, "--report", "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: cannot write the report in {out}: Is a directory"], result.stderr
