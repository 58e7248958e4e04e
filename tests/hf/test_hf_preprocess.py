"""Preprocessing read from Hugging Face image processors (and torchvision's weights transforms),
reproduced by the torch-free runtime, checked against the libraries themselves; and the overlay
placement for the geometry they add (an exact resize that stretches a non-square photo, a
shortest-edge resize then a centre crop)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import SHARED
from vit_explain.metadata import PreprocessConfig
from vit_explain.outputs.placement import grid_box, place_mask
from vit_explain.runtime.preprocess import preprocess_image, resize_geometry

SHARED_IMAGES = SHARED / "images"
TOLERANCE = 1e-5  # as tests/runtime/test_preprocess.py (timm)
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

#: (processor class, settings): the kinds the supported model types use, at their real sizes.
PROCESSORS = {
    "vit": ("ViTImageProcessor", dict(size={"height": 224, "width": 224})),
    "deit": ("DeiTImageProcessor", dict(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224},
                                        resample=3, **IMAGENET)),
    "beit": ("BeitImageProcessor", dict(size={"height": 224, "width": 224}, do_center_crop=False)),
    "dinov2": ("BitImageProcessor", dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                         resample=3, **IMAGENET)),
}


def _photos() -> list[Image.Image]:
    if not SHARED_IMAGES.is_dir():
        pytest.skip("no ../shared/images")
    return [Image.open(path).convert("RGB") for path in sorted(SHARED_IMAGES.iterdir())]


def _processors(tmp_path, key: str):
    """(what AutoImageProcessor.from_pretrained gives for the saved folder, its PIL backend, ours)."""
    transformers = pytest.importorskip("transformers")
    from vit_explain.families.hf_preprocess import preprocess_from_processor

    name, settings = PROCESSORS[key]
    getattr(transformers, name)(**settings).save_pretrained(tmp_path)
    default = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    pil = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    return default, pil, preprocess_from_processor(default)


def _theirs(processor, photo: Image.Image) -> np.ndarray:
    return np.asarray(processor(photo, return_tensors="np")["pixel_values"][0], dtype=np.float32)


@pytest.mark.parametrize("key", sorted(PROCESSORS))
def test_real_photos_match_what_auto_image_processor_gives(tmp_path, key):
    default, _, ours = _processors(tmp_path, key)
    for photo in _photos():
        error = float(np.abs(preprocess_image(photo, ours) - _theirs(default, photo)).max())
        assert error <= TOLERANCE, (key, photo.size, error)


def _reshaped(photos: list[Image.Image]) -> list[Image.Image]:
    """Non-square and larger versions of the real photos (the resize then does real work)."""
    out = []
    for photo in photos:
        out += [photo.resize((400, 300), Image.Resampling.BICUBIC), photo.crop((0, 0, 224, 151)),
                photo.resize((333, 1000), Image.Resampling.BICUBIC)]
    return out


@pytest.mark.parametrize("key", sorted(PROCESSORS))
def test_resized_photos_match_the_pil_backend_and_nearly_the_torchvision_one(tmp_path, key):
    """transformers' PIL backend resizes with the same Pillow call: equal to 1e-5 (crop offsets
    included: an odd surplus, 379 - 224, is cut as transformers does). Its default torchvision
    backend rounds its antialiased uint8 resize differently: up to three grey levels
    (``3 / (255 * std)``, bicubic, a 3x downscale), in up to ~13% of the values, a mean difference
    of up to 0.13 grey level (measured on these photos; bounded here at 4 and 0.2)."""
    default, pil, ours = _processors(tmp_path, key)
    level = 1 / (255 * min(ours.std))
    for photo in _reshaped(_photos()):
        mine = preprocess_image(photo, ours)
        assert float(np.abs(mine - _theirs(pil, photo)).max()) <= TOLERANCE, (key, photo.size)
        difference = np.abs(mine - _theirs(default, photo))
        assert float(difference.max()) <= 4 * level + TOLERANCE, (key, photo.size, float(difference.max()))
        assert float(difference.mean()) <= 0.2 * level, (key, photo.size, float(difference.mean()))


def test_torchvision_weights_transform_matches(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from vit_explain.families.torchvision_vit import TorchvisionViT

    class Model:  # what the adapter reads: the architecture and its input size
        arch_name, image_size = "vit_b_16", 224

    ours = TorchvisionViT().preprocess(Model())
    assert ours.resize_size == (256,) and ours.input_size == (3, 224, 224) and ours.interpolation == "bilinear"
    transform = torchvision.models.ViT_B_16_Weights.DEFAULT.transforms()
    for photo in _photos() + _reshaped(_photos()):
        theirs = transform(photo).numpy()
        assert float(np.abs(preprocess_image(photo, ours) - theirs).max()) <= TOLERANCE, photo.size


def test_processor_settings_the_runtime_cannot_reproduce_are_refused():
    from types import SimpleNamespace

    from vit_explain.errors import ExportError
    from vit_explain.families.hf_preprocess import preprocess_from_processor

    base = dict(do_resize=True, size={"height": 32, "width": 32}, do_center_crop=False, resample=2, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert preprocess_from_processor(SimpleNamespace(**base)).resize_size == (32, 32)
    for change, words in (
        (dict(do_resize=False), "does not resize"),
        (dict(rescale_factor=1.0), "rescale_factor"),
        (dict(size={"shortest_edge": 32}), "without a crop"),
        (dict(size={"longest_edge": 32}), "not supported"),
        (dict(resample=7), "resample"),
    ):
        with pytest.raises(ExportError, match=words):
            preprocess_from_processor(SimpleNamespace(**{**base, **change}))


PATCH, GRID, HOT = 8, 6, (2, 4)


@pytest.mark.parametrize("zoom", [1, 2])
def test_a_hot_patch_lands_on_its_pixels_when_the_resize_stretches(zoom):
    """An exact 48x48 resize of a 3:1 photo: each patch covers 24 x 8 photo pixels (times zoom)."""
    cfg = PreprocessConfig((3, 48, 48), "bilinear", (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, resize_size=(48, 48))
    width, height = 48 * 3 * zoom, 48 * zoom
    sx, sy = 3 * zoom, zoom
    left, top = HOT[1] * PATCH * sx, HOT[0] * PATCH * sy
    pixels = np.full((height, width, 3), 40, np.uint8)
    pixels[top : top + PATCH * sy, left : left + PATCH * sx] = 250
    patch_means = preprocess_image(Image.fromarray(pixels), cfg).mean(axis=0).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    assert np.unravel_index(patch_means.argmax(), patch_means.shape) == HOT
    geometry = resize_geometry(width, height, cfg)
    assert geometry.resized_size == (48, 48) and (geometry.crop_left, geometry.crop_top) == (0, 0)
    mask = np.zeros((GRID, GRID))
    mask[HOT] = 1.0
    placed = place_mask(mask, (width, height), grid_box(geometry, (GRID, GRID), (PATCH, PATCH)))
    assert placed.covers_image
    centre_x, centre_y = left + PATCH * sx // 2, top + PATCH * sy // 2
    # the patch centre lies on a pixel edge: the four pixels around it tie (to rounding)
    peak = np.argwhere(np.isclose(placed.heat, placed.heat.max(), rtol=0, atol=1e-12))
    assert sorted(map(tuple, peak)) == [(y, x) for y in (centre_y - 1, centre_y) for x in (centre_x - 1, centre_x)]


def test_a_hot_patch_lands_on_its_pixels_after_shortest_edge_and_crop():
    """Shortest edge 56 then a 48 crop (transformers' offsets), on a photo at twice that size."""
    cfg = PreprocessConfig((3, 48, 48), "bilinear", (0.5,) * 3, (0.5,) * 3, crop_pct=1.0, crop_mode="center_floor",
                           resize_size=(56,))
    width, height = 226, 112  # resized to 113 x 56: an odd surplus of 65, cut 32 left and 33 right
    geometry = resize_geometry(width, height, cfg)
    assert geometry.resized_size == (113, 56) and (geometry.crop_left, geometry.crop_top) == (32, 4)
    left, top = (geometry.crop_left + HOT[1] * PATCH) * 2, (geometry.crop_top + HOT[0] * PATCH) * 2
    mask = np.zeros((GRID, GRID))
    mask[HOT] = 1.0
    placed = place_mask(mask, (width, height), grid_box(geometry, (GRID, GRID), (PATCH, PATCH)))
    peak = np.argwhere(placed.heat == placed.heat.max())
    centre_x, centre_y = left + PATCH, top + PATCH
    assert sorted(map(tuple, peak)) == [(y, x) for y in (centre_y - 1, centre_y) for x in (centre_x - 1, centre_x)]
    assert placed.window == (64, 8, 160, 104)
