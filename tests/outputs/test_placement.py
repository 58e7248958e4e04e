"""Masks placed where the model looked (issue 14): the inverse of timm's resize and centre crop.

Before ``vit_explain.outputs.placement`` the overlay stretched the mask over the whole photo, so
on a 672x224 panorama the middle third's mask was smeared three times as wide, and DeiT's
crop_pct 0.875 shifted even square photos. These tests place a known hot patch and check the
result to the pixel, on wide, tall and square photos at several crop_pct.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from vit_explain.metadata import PreprocessConfig
from vit_explain.outputs.overlay import overlay
from vit_explain.outputs.placement import grid_box, place_mask
from vit_explain.runtime.preprocess import preprocess_image, resize_geometry

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PATCH, GRID = 16, 14
HOT = (3, 10)  # (row, column) of the hot patch


def _config(crop_pct: float) -> PreprocessConfig:
    return PreprocessConfig((3, 224, 224), "bicubic", crop_pct=crop_pct, **IMAGENET)


def _photo_size(shape: str, short: int) -> tuple[int, int]:
    return {"wide": (3 * short, short), "tall": (short, 3 * short), "square": (short, short)}[shape]


CASES = [
    (shape, crop_pct, zoom)
    for shape in ("wide", "tall", "square")
    for crop_pct in (1.0, 0.875, 0.9)
    for zoom in (1, 2)
]


@pytest.mark.parametrize(("shape", "crop_pct", "zoom"), CASES)
def test_a_hot_patch_lands_on_its_pixels(shape: str, crop_pct: float, zoom: int) -> None:
    """A bright block in the photo becomes the hot patch; placed back, its peak is the block's centre.

    The photo's short side is ``zoom`` times timm's resize target, so the inverse maps input pixels
    to whole ``zoom x zoom`` blocks and every expected position is an exact integer.
    """
    cfg = _config(crop_pct)
    short = int(224 / crop_pct) * zoom
    width, height = _photo_size(shape, short)
    geo = resize_geometry(width, height, cfg)
    assert geo.resized_size == (width // zoom, height // zoom)
    # the hot patch's pixels in the original photo
    left = (geo.crop_left + HOT[1] * PATCH) * zoom
    top = (geo.crop_top + HOT[0] * PATCH) * zoom
    pixels = np.full((height, width, 3), 40, np.uint8)
    pixels[top : top + PATCH * zoom, left : left + PATCH * zoom] = 250
    model_input = preprocess_image(Image.fromarray(pixels), cfg).mean(axis=0)
    patch_means = model_input.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    assert np.unravel_index(patch_means.argmax(), patch_means.shape) == HOT  # the forward direction
    mask = np.zeros((GRID, GRID))
    mask[HOT] = 1.0

    placed = place_mask(mask, (width, height), grid_box(geo, (GRID, GRID), (PATCH, PATCH)))

    centre_x, centre_y = left + PATCH * zoom // 2, top + PATCH * zoom // 2
    peak = np.argwhere(placed.heat == placed.heat.max())
    assert sorted(map(tuple, peak)) == [(y, x) for y in (centre_y - 1, centre_y) for x in (centre_x - 1, centre_x)]
    seen = (geo.crop_left * zoom, geo.crop_top * zoom, (geo.crop_left + 224) * zoom, (geo.crop_top + 224) * zoom)
    assert placed.window == seen
    outside = np.ones(placed.heat.shape, bool)
    outside[seen[1] : seen[3], seen[0] : seen[2]] = False
    assert not placed.heat[outside].any()


def test_the_panorama_window_is_its_middle_third() -> None:
    """The issue's example: three 224 px photos side by side, DeiT's crop_pct 0.875."""
    geo = resize_geometry(672, 224, _config(0.875))
    box = grid_box(geo, (GRID, GRID), (PATCH, PATCH))
    assert box == pytest.approx((238.0, 14.0, 434.0, 210.0))
    placed = place_mask(np.ones((GRID, GRID)), (672, 224), box)
    assert placed.window == (238, 14, 434, 210)
    assert placed.heat[14:210, 238:434].min() == 1.0 and placed.heat.sum() == 196 * 196


def test_the_grid_covers_only_whole_patches() -> None:
    """100 px input, 16 px patches: the patch embedding drops the last 4 px, so does the window."""
    cfg = PreprocessConfig((3, 100, 100), "bicubic", crop_pct=1.0, **IMAGENET)
    box = grid_box(resize_geometry(200, 200, cfg), (6, 6), (16, 16))
    assert box == pytest.approx((0.0, 0.0, 192.0, 192.0))
    placed = place_mask(np.ones((6, 6)), (200, 200), box)
    assert placed.window == (0, 0, 192, 192) and not placed.heat[:, 192:].any() and not placed.heat[192:].any()


def test_padding_extends_the_box_and_the_window_is_clipped() -> None:
    """Border mode pads a wide photo above and below: the box runs past it, the window does not."""
    cfg = PreprocessConfig((3, 224, 224), "bicubic", crop_pct=1.0, crop_mode="border", **IMAGENET)
    box = grid_box(resize_geometry(400, 100, cfg), (GRID, GRID), (PATCH, PATCH))
    assert box == pytest.approx((0.0, -150.0, 400.0, 250.0))
    mask = np.zeros((GRID, GRID))
    mask[7, 0] = 1.0  # centre: input (8, 120) -> resized (8, 120 - 84) -> photo (14.3, 64.3)
    placed = place_mask(mask, (400, 100), box)
    assert placed.window == (0, 0, 400, 100) and placed.covers_image
    peak = np.argwhere(placed.heat == placed.heat.max())
    # pixel row 64 (centre 64.5) is nearest; left of the patch centre bilinear clamps to its value
    assert sorted(map(tuple, peak)) == [(64, x) for x in range(14)]  # centres < 14.3


def test_identity_placement_is_evaluates_bilinear_upsampling() -> None:
    """``box=None``: the grid covers the pixels exactly, as torch's bilinear (align_corners=False)."""
    torch = pytest.importorskip("torch")
    mask = np.random.default_rng(0).random((6, 8))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None], size=(96, 128), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    placed = place_mask(mask, (128, 96))
    assert placed.covers_image
    np.testing.assert_allclose(placed.heat, expected, atol=1e-12)


# --------------------------------------------------------------------------- the overlay


def _is_grey(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])


def test_the_overlay_marks_what_the_model_did_not_see() -> None:
    """Outside the seen window: grey (no colormap colour), dimmed; a white frame around the window."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(60, 200, (224, 672, 3), dtype=np.uint8))
    box = grid_box(resize_geometry(672, 224, _config(1.0)), (GRID, GRID), (PATCH, PATCH))
    out = np.asarray(overlay(photo, rng.random((GRID, GRID), dtype=np.float32), box=box))
    assert out.shape == (224, 672, 3)
    assert _is_grey(out[:, :223]).all() and _is_grey(out[:, 449:]).all()
    assert (out[:, 223] == 255).all() and (out[:, 448] == 255).all()  # the frame, 1 px at 224 px
    assert not _is_grey(out[:, 224:448]).all(axis=0).any()  # every seen column is coloured
    assert out[:, :223].mean() < 0.6 * np.asarray(photo)[:, :223].mean()  # dimmed


def test_the_overlay_of_a_square_photo_at_crop_pct_0875_has_a_border() -> None:
    photo = Image.new("RGB", (256, 256), (30, 160, 60))
    box = grid_box(resize_geometry(256, 256, _config(0.875)), (GRID, GRID), (PATCH, PATCH))
    out = np.asarray(overlay(photo, np.ones((GRID, GRID), np.float32), alpha=0.5, box=box))
    assert _is_grey(out[:15]).all() and _is_grey(out[:, 241:]).all()
    assert not _is_grey(out[16:240, 16:240]).any()


# --------------------------------------------------------------------------- end to end


def test_explaining_a_panorama_paints_only_its_middle_third(export_family, tmp_path: Path) -> None:
    """Three photos side by side through the whole pipeline (random DeiT, timm's crop_pct 0.9).

    Short side 224 -> 248, so the photo is scaled by 744 / 672 and the 224 px crop starts 260 px
    (12 px) into the resized width (height): the middle photo minus a 10.8 px border.
    """
    from vit_explain.discovery import InputImage
    from vit_explain.pipeline import ExplainSettings, explain_images
    from vit_explain.runtime import Explainer

    exported = export_family("deit")
    explainer = Explainer(exported.path)
    assert explainer.metadata.preprocess.crop_pct == pytest.approx(0.9)
    rng = np.random.default_rng(2)
    thirds = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "triple.png"
    Image.fromarray(np.concatenate(thirds, axis=1)).save(path)
    # the same panorama as a phone stores it: sideways, with EXIF orientation 6 ("rotate to show")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(path).transpose(Image.Transpose.ROTATE_90).save(rotated, quality=95, exif=exif)
    settings = ExplainSettings("rollout", "max", 0.9)
    items = [InputImage(path, PurePosixPath("triple.png")), InputImage(rotated, PurePosixPath("rotated.jpg"))]
    outcome, sideways = explain_images(explainer, items, tmp_path / "out", settings)
    assert outcome.status == sideways.status == "done", (outcome.error, sideways.error)

    scale = 672 / 744
    for done in (outcome, sideways):
        record = json.loads(done.files["json"].read_text(encoding="utf-8"))
        assert record["crop_window"] == pytest.approx([260 * scale, 12 * scale, 484 * scale, 236 * scale], abs=1e-4)
        with Image.open(done.files["rollout.png"]) as png:
            out = np.asarray(png.convert("RGB"))
        assert out.shape == (224, 672, 3)  # upright
        # seen: pixels whose centre is inside the window, columns 235..436 and rows 11..212
        assert _is_grey(out[:, :235]).all() and _is_grey(out[:, 437:]).all()
        assert _is_grey(out[:11]).all() and _is_grey(out[213:]).all()
        assert not _is_grey(out[11:213, 235:437]).all()
    # the model saw the middle photo only: its mask is that photo's own
    middle = explainer.explain([Image.fromarray(thirds[1])], method="rollout", head_fusion="max", discard_ratio=0.9)
    np.testing.assert_allclose(np.load(outcome.files["rollout.npy"]), middle.masks[0], atol=1e-6)
