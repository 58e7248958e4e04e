"""Tests for vit_explain.outputs.overlay: mask upsampling, colours and blending."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from vit_explain.outputs.overlay import available_colormaps, colorize, overlay, upsample_mask


def _peak_mask(h: int = 14, w: int = 14) -> np.ndarray:
    """A mask with one hot patch, max 1, like a normalised rollout."""
    mask = np.zeros((h, w), np.float32)
    mask[h // 2, w // 3] = 1.0
    return mask


# --------------------------------------------------------------------------- upsample_mask


def test_upsample_returns_height_width_float32_in_range() -> None:
    out = upsample_mask(np.random.default_rng(0).random((14, 14), dtype=np.float32), (224, 224))
    assert out.shape == (224, 224)
    assert out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_upsample_non_square_size_is_width_height() -> None:
    out = upsample_mask(np.ones((16, 22), np.float32), (352, 256))
    assert out.shape == (256, 352)


def test_upsample_is_smooth_not_blocky() -> None:
    out = upsample_mask(_peak_mask(), (224, 224))
    # Nearest-neighbour would give only the two values {0, 1}; interpolation gives a ramp.
    assert len(np.unique(np.round(out, 3))) > 20
    row = out[out.argmax() // 224]
    assert np.all(np.abs(np.diff(row)) < 0.2), "neighbouring pixels should not jump"


def test_upsample_keeps_constant_mask_constant() -> None:
    out = upsample_mask(np.full((14, 14), 0.25, np.float32), (100, 60))
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_upsample_clips_and_cleans_bad_values() -> None:
    mask = np.array([[np.nan, 2.0], [-1.0, 0.5]], np.float32)
    out = upsample_mask(mask, (8, 8))
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.zeros(5), np.zeros((0, 4))])
def test_upsample_rejects_non_2d_or_empty(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        upsample_mask(bad, (10, 10))


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 5)])
def test_upsample_rejects_bad_size(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        upsample_mask(_peak_mask(), size)


# --------------------------------------------------------------------------- colorize


@pytest.mark.parametrize("name", ["jet", "viridis", "inferno"])
def test_colorize_uses_matplotlib_registry(name: str) -> None:
    mask = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rgb = colorize(mask, name)
    expected = matplotlib.colormaps[name](mask, bytes=True)[..., :3]
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    np.testing.assert_array_equal(rgb, expected)


def test_colorize_jet_endpoints_are_blue_and_red() -> None:
    rgb = colorize(np.array([[0.0, 1.0]], np.float32), "jet")
    low, high = rgb[0, 0].astype(int), rgb[0, 1].astype(int)
    assert low[2] > 100 and low[0] < 50, low  # dark blue
    assert high[0] > 100 and high[2] < 50, high  # dark red


def test_colorize_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        colorize(_peak_mask(), "no-such-map")
    message = str(info.value)
    assert "no-such-map" in message and "viridis" in message and "jet" in message


def test_available_colormaps() -> None:
    names = available_colormaps()
    assert {"jet", "viridis", "turbo"} <= set(names)
    assert names == sorted(names)


# --------------------------------------------------------------------------- overlay


def test_overlay_keeps_original_size_and_is_rgb() -> None:
    image = Image.new("RGB", (300, 200), (0, 128, 0))
    out = overlay(image, np.random.default_rng(1).random((16, 22), dtype=np.float32))
    assert out.size == (300, 200)
    assert out.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_overlay_accepts_other_image_modes(mode: str) -> None:
    out = overlay(Image.new(mode, (50, 40)), _peak_mask())
    assert out.mode == "RGB" and out.size == (50, 40)


def test_overlay_alpha_is_weight_of_heatmap() -> None:
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = _peak_mask()
    assert np.array_equal(np.asarray(overlay(image, mask, alpha=0.0)), np.asarray(image))
    heat = colorize(upsample_mask(mask, (64, 64)), "jet")
    np.testing.assert_array_equal(np.asarray(overlay(image, mask, alpha=1.0)), heat)
    half = np.asarray(overlay(image, mask, alpha=0.5)).astype(int)
    expected = (np.asarray(image).astype(int) + heat.astype(int)) / 2
    assert np.abs(half - expected).max() <= 1


def test_overlay_hot_patch_lands_where_the_mask_says() -> None:
    image = Image.new("RGB", (280, 140), (128, 128, 128))
    mask = np.zeros((7, 14), np.float32)
    mask[1, 12] = 1.0  # top right
    out = np.asarray(overlay(image, mask, "jet", alpha=1.0)).astype(int)
    redness = out[..., 0] - out[..., 2]
    y, x = np.unravel_index(redness.argmax(), redness.shape)
    assert y < 70 and x > 200


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_overlay_rejects_alpha_out_of_range(alpha: float) -> None:
    with pytest.raises(ValueError):
        overlay(Image.new("RGB", (8, 8)), _peak_mask(), alpha=alpha)


def test_module_does_not_import_pyplot() -> None:
    code = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from vit_explain.outputs import overlay\n"
        "overlay(Image.new('RGB', (8, 8)), np.ones((2, 2), np.float32))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
