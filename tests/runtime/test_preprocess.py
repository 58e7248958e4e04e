"""Preprocessing: the numpy/Pillow pipeline must equal timm's eval transform exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import SHARED
from vit_explain.metadata import PreprocessConfig
from vit_explain.runtime.images import load_image
from vit_explain.runtime.preprocess import (
    INTERPOLATIONS,
    preprocess_batch,
    preprocess_image,
    resize_geometry,
    scale_size,
)

SHARED_IMAGES = SHARED / "images"
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
TOLERANCE = 1e-5
WHITE_RGB = (255, 255, 255)

CONFIGS = {
    "deit": PreprocessConfig((3, 224, 224), "bicubic", crop_pct=0.875, **IMAGENET),
    "deit-0.9": PreprocessConfig((3, 224, 224), "bicubic", crop_pct=0.9, **IMAGENET),
    "dinov2": PreprocessConfig((3, 224, 224), "bicubic", crop_pct=1.0, **IMAGENET),
    "non-square": PreprocessConfig((3, 224, 320), "bicubic", crop_pct=0.875, **IMAGENET),
    "tall-1.0": PreprocessConfig((3, 320, 224), "bicubic", crop_pct=1.0, **CLIP),
    "squash": PreprocessConfig((3, 224, 224), "bicubic", crop_pct=0.95, crop_mode="squash", **IMAGENET),
    "squash-non-square": PreprocessConfig((3, 192, 256), "bilinear", crop_pct=1.0, crop_mode="squash", **CLIP),
    "border": PreprocessConfig((3, 224, 224), "bicubic", crop_pct=1.0, crop_mode="border", **IMAGENET),
    "border-0.9": PreprocessConfig((3, 224, 288), "bilinear", crop_pct=0.9, crop_mode="border", **CLIP),
    "bilinear": PreprocessConfig((3, 224, 224), "bilinear", crop_pct=0.875, **IMAGENET),
    "zoom-out": PreprocessConfig((3, 224, 224), "lanczos", crop_pct=1.15, **IMAGENET),  # pads with zeros
    "nearest": PreprocessConfig((3, 64, 96), "nearest", crop_pct=0.8, mean=(0.5,) * 3, std=(0.5,) * 3),
}

SIZES = [(224, 224), (256, 256), (640, 480), (480, 640), (333, 517), (1, 1), (7, 300), (100, 60), (225, 229)]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2)
    return Image.fromarray(rgb.round().astype(np.uint8))


def _timm_reference(images: list[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    pytest.importorskip("timm")
    from timm.data.transforms_factory import transforms_imagenet_eval

    transform = transforms_imagenet_eval(
        img_size=cfg.input_size[1:],
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )
    return np.stack([transform(img).numpy() for img in images])


def _assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= TOLERANCE


# --------------------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_timm(name: str) -> None:
    cfg = CONFIGS[name]
    images = [_noise(w, h, seed=i) for i, (w, h) in enumerate(SIZES)] + [_gradient(301, 199)]
    ref = _timm_reference(images, cfg)
    _assert_parity(preprocess_batch(images, cfg), ref)


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_parity_every_interpolation(interpolation: str) -> None:
    cfg = PreprocessConfig((3, 224, 224), interpolation, crop_pct=0.9, **IMAGENET)
    images = [_noise(500, 375), _gradient(150, 97)]
    _assert_parity(preprocess_batch(images, cfg), _timm_reference(images, cfg))


@pytest.mark.parametrize(
    "model_name",
    ["deit_tiny_patch16_224.fb_in1k", "vit_small_patch14_dinov2.lvd142m", "vit_base_patch16_clip_224.openai",
     "vit_5b_patch16_sapiens2.fb"],  # the last: non-square 1024x768 squash
)
def test_parity_with_timm_resolved_config(model_name: str) -> None:
    """Configs exactly as ``resolve_data_config`` produces them, through ``create_transform``."""
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None:
        pytest.skip(f"{model_name} is not known to this timm")
    data_cfg = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    cfg = PreprocessConfig(**data_cfg)
    transform = create_transform(**data_cfg)
    images = [_noise(640, 427), _noise(300, 500, seed=3)]
    ref = np.stack([transform(img).numpy() for img in images])
    _assert_parity(preprocess_batch(images, cfg), ref)


def test_parity_on_loaded_modes(tmp_path: Path) -> None:
    """Loaded non-RGB images go through the same pipeline as timm given the same RGB image."""
    cfg = CONFIGS["deit"]
    sources = {
        "L": Image.new("L", (300, 200), 77),
        "RGBA": _noise(250, 260).convert("RGBA"),
        "P": _gradient(240, 330).convert("P"),
    }
    images = []
    for mode, img in sources.items():
        path = tmp_path / f"{mode}.png"
        img.save(path)
        images.append(load_image(path))
    _assert_parity(preprocess_batch(images, cfg), _timm_reference(images, cfg))


@pytest.mark.skipif(not SHARED_IMAGES.is_dir(), reason="no shared/images directory")
@pytest.mark.parametrize("name", ["deit", "dinov2", "non-square", "squash", "border"])
def test_parity_on_real_photos(name: str) -> None:
    paths = sorted(SHARED_IMAGES.glob("*.png"))
    if not paths:
        pytest.skip("no PNG in shared/images")
    cfg = CONFIGS[name]
    images = [load_image(p) for p in paths]
    _assert_parity(preprocess_batch(images, cfg), _timm_reference(images, cfg))


# --------------------------------------------------------------------------- geometry and rounding


def test_scale_size_floors() -> None:
    assert scale_size(CONFIGS["deit"]) == (256, 256)  # 224 / 0.875
    assert scale_size(CONFIGS["deit-0.9"]) == (248, 248)  # floor(248.88)
    assert scale_size(CONFIGS["non-square"]) == (256, 365)  # floor(365.71)


def test_short_side_resize_truncates() -> None:
    # torchvision Resize(256) on 640x427: long side int(256 * 640 / 427) = int(383.7) = 383
    geo = resize_geometry(640, 427, CONFIGS["deit"])
    assert geo.resized_size == (383, 256)
    assert (geo.crop_left, geo.crop_top) == (80, 16)  # round(79.5) -> 80 (even), round(16.0)


@pytest.mark.parametrize(("height", "top"), [(227, 2), (229, 2), (226, 1), (225, 0)])
def test_center_crop_rounds_half_to_even(height: int, top: int) -> None:
    # crop_pct 1.0: the short side (width 224) is kept, the surplus height is split
    geo = resize_geometry(224, height, CONFIGS["dinov2"])
    assert geo.resized_size == (224, height)
    assert geo.crop_top == top


def test_non_square_center_matches_short_edge_with_round() -> None:
    # ResizeKeepRatio(longest=0) to (256, 365): scale by min(h/256, w/365), round each side
    geo = resize_geometry(1000, 1000, CONFIGS["non-square"])
    assert geo.resized_size == (365, 365)
    assert geo.output_size == (320, 224)
    geo = resize_geometry(2000, 500, CONFIGS["non-square"])
    assert geo.resized_size == (1024, 256)


def test_border_mode_pads_with_rounded_mean() -> None:
    geo = resize_geometry(400, 100, CONFIGS["border"])
    assert geo.resized_size == (224, 56)
    assert geo.fill == (124, 116, 104)  # round(255 * mean)
    assert geo.needs_padding and geo.crop_top == -84
    out = preprocess_image(Image.new("RGB", (400, 100), (124, 116, 104)), CONFIGS["border"])
    expected = ((np.array([124, 116, 104]) / 255 - IMAGENET["mean"]) / IMAGENET["std"]).astype(np.float32)
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-6)


def test_zoom_out_pads_with_black() -> None:
    cfg = CONFIGS["zoom-out"]  # 224 / 1.15 -> resized to 194, padded to 224
    geo = resize_geometry(300, 300, cfg)
    assert geo.resized_size == (194, 194) and geo.crop_left == -15 and geo.fill == (0, 0, 0)
    out = preprocess_image(Image.new("RGB", (300, 300), WHITE_RGB), cfg)
    black = (-np.array(IMAGENET["mean"]) / IMAGENET["std"]).astype(np.float32)
    np.testing.assert_allclose(out[:, 0, 0], black, atol=1e-6)



def test_crop_box_in_original() -> None:
    geo = resize_geometry(448, 448, CONFIGS["deit"])
    assert geo.resized_size == (256, 256)
    assert geo.crop_box_in_original() == pytest.approx((28.0, 28.0, 420.0, 420.0))


def test_extreme_aspect_ratio_does_not_crash() -> None:
    out = preprocess_image(Image.new("RGB", (5000, 1), WHITE_RGB), CONFIGS["border"])
    assert out.shape == (3, 224, 224)


# --------------------------------------------------------------------------- API contract


def test_batch_shape_dtype_contiguity() -> None:
    cfg = CONFIGS["non-square"]
    batch = preprocess_batch([_noise(50, 70), _noise(640, 480, seed=2), Image.new("L", (9, 9), 3)], cfg)
    assert batch.shape == (3, 3, 224, 320)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    single = preprocess_image(_noise(640, 480, seed=2), cfg)
    assert single.shape == (3, 224, 320) and single.dtype == np.float32
    np.testing.assert_array_equal(single, batch[1])


def test_empty_batch() -> None:
    assert preprocess_batch([], CONFIGS["deit"]).shape == (0, 3, 224, 224)


def test_non_rgb_input_is_converted_like_load_image() -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    white = Image.new("RGB", (64, 64), WHITE_RGB)
    cfg = CONFIGS["deit"]
    np.testing.assert_array_equal(preprocess_image(rgba, cfg), preprocess_image(white, cfg))


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig((3, 224, 224), interpolation="cubic"),
        PreprocessConfig((3, 224, 224), crop_mode="centre"),
        PreprocessConfig((1, 224, 224)),
    ],
)
def test_invalid_config(cfg: PreprocessConfig) -> None:
    with pytest.raises(ValueError):
        preprocess_batch([_noise(10, 10)], cfg)
