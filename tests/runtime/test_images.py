"""Image loading: every Pillow mode becomes 8-bit RGB, and every bad input a one-line ImageError."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from vit_explain.errors import ImageError
from vit_explain.runtime.images import BACKGROUND, is_image_file, load_image, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


def _assert_rgb8(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert np.asarray(img).dtype == np.uint8


def _assert_image_error(path: Path, match: str | None = None, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    if match is not None:
        assert match in message
    return info.value


# --------------------------------------------------------------------------- modes


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(data).save(path)
    img = load_image(path)
    _assert_rgb8(img)
    np.testing.assert_array_equal(np.asarray(img), data)


def test_path_given_as_str(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (3, 2), RED).save(path)
    assert load_image(str(path)).size == (3, 2)


def test_tiny_1x1(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    img = load_image(path)
    assert img.size == (1, 1)
    assert _pixel(img, (0, 0)) == (10, 20, 30)


def test_grayscale_l(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (4, 3), 100).save(path)
    img = load_image(path)
    _assert_rgb8(img)
    assert _pixel(img, (2, 1)) == (100, 100, 100)


def test_one_bit(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    im = Image.new("1", (8, 2), 0)
    im.putpixel((3, 1), 1)
    im.save(path)
    img = load_image(path)
    _assert_rgb8(img)
    assert _pixel(img, (3, 1)) == WHITE
    assert _pixel(img, (0, 0)) == (0, 0, 0)


def test_la_transparent_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    im = Image.new("LA", (2, 1), (100, 255))
    im.putpixel((1, 0), (100, 0))
    im.save(path)
    img = load_image(path)
    _assert_rgb8(img)
    assert _pixel(img, (0, 0)) == (100, 100, 100)
    assert _pixel(img, (1, 0)) == WHITE


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    im = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    im.save(path)
    img = load_image(path)
    _assert_rgb8(img)
    assert BACKGROUND == WHITE
    assert _pixel(img, (0, 0)) == WHITE
    assert _pixel(img, (1, 0)) == RED
    assert all(abs(v - 127) <= 1 for v in _pixel(img, (2, 0)))


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("RGB", (4, 4), BLUE).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    assert _pixel(load_image(path), (1, 1)) == BLUE


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, suffix: str) -> None:
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    path = tmp_path / f"ptrans{suffix}"
    im.save(path, transparency=0)
    img = load_image(path)
    _assert_rgb8(img)
    assert _pixel(img, (0, 0)) == WHITE
    assert _pixel(img, (1, 0)) == RED


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # "I;16" in Pillow >= 10.?, "I" before
    img = load_image(path)
    _assert_rgb8(img)
    got = np.asarray(img)[0, :, 0].tolist()
    assert got[0] == 0 and got[1] == 1 and got[3] == 255
    assert abs(got[2] - 128) <= 1


def test_16bit_big_endian_in_memory() -> None:
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (3, 1), values.tobytes())
    got = np.asarray(load_image(im))[0, :, 0].tolist()
    assert got[0] == 0 and got[2] == 255 and abs(got[1] - 128) <= 1


def test_32bit_int_mode_i(tmp_path: Path) -> None:
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"
    got = np.asarray(load_image(path))[0, :, 0].tolist()
    assert got == [0, 255]


def test_32bit_int_outside_16bit_range_is_stretched() -> None:
    im = Image.fromarray(np.array([[-1000, 0, 1_000_000]], dtype=np.int32))
    got = np.asarray(load_image(im))[0, :, 0].tolist()
    assert got[0] == 0 and got[2] == 255


def test_float_mode_f(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "F"
    img = load_image(path)
    _assert_rgb8(img)
    got = np.asarray(img)[0, :, 0].tolist()
    assert got[0] == 0 and got[2] == 255 and abs(got[1] - 64) <= 1


def test_float_with_nan_and_wide_range() -> None:
    im = Image.fromarray(np.array([[np.nan, -5.0, 5.0]], dtype=np.float32))
    got = np.asarray(load_image(im))[0, :, 0].tolist()
    assert got[1] == 0 and got[2] == 255


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cmyk.{fmt.lower()}"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format=fmt)  # pure red
    img = load_image(path)
    _assert_rgb8(img)
    r, g, b = _pixel(img, (4, 4))
    assert r > 240 and g < 15 and b < 15


def test_in_memory_image_is_converted_and_copied() -> None:
    src = Image.new("RGB", (5, 4), RED)
    out = load_image(src)
    assert out is not src and out.size == (5, 4)
    assert to_rgb(src) is src


# --------------------------------------------------------------------------- EXIF


def _red_left_blue_right(width: int = 40, height: int = 20) -> Image.Image:
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED)],  # 6: rotate 90 clockwise to view; 8: counter-clockwise
)
def test_exif_orientation_applied(tmp_path: Path, orientation: int, top, bottom) -> None:
    path = tmp_path / f"rot{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _red_left_blue_right().save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (20, 40)  # width and height swapped

    def close(actual, expected) -> bool:
        return all(abs(a - e) < 40 for a, e in zip(actual, expected, strict=True))

    assert close(_pixel(img, (10, 5)), top)
    assert close(_pixel(img, (10, 34)), bottom)


def test_no_exif_keeps_orientation(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    _red_left_blue_right().save(path)
    img = load_image(path)
    assert img.size == (40, 20)
    assert _pixel(img, (5, 10)) == RED


# --------------------------------------------------------------------------- large images


def test_jpeg_draft_reduces_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 200)).save(path, quality=80)
    assert load_image(path).size == (4000, 3000)
    small = load_image(path, target_size=(224, 224))
    assert small.size[0] < 4000 and small.size[1] < 3000
    assert min(small.size) >= 224  # never below what the resize step needs
    _assert_rgb8(small)


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (600, 500), RED).save(path)
    assert load_image(path, target_size=(64, 64)).size == (600, 500)


# --------------------------------------------------------------------------- refusals


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid small PNG whose IHDR is patched to claim ``width x height`` (a bomb's header)."""
    Image.new("1", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_decompression_bomb_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    _png_declaring(path, 100_000, 100_000)
    assert path.stat().st_size < 1000
    _assert_image_error(path, match="refused")
    assert is_image_file(path)  # it *is* an image: loading explains why it is refused


def test_max_pixels_limit(tmp_path: Path) -> None:
    path = tmp_path / "limit.png"
    Image.new("RGB", (100, 100)).save(path)
    _assert_image_error(path, match="limit", max_pixels=9_999)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert load_image(path, max_pixels=None).size == (100, 100)


def test_missing_file(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "nope.png", match="no such file")


def test_directory(tmp_path: Path) -> None:
    _assert_image_error(tmp_path, match="directory")


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_image_error(path, match="empty")
    assert not is_image_file(path)


@pytest.mark.parametrize("content", [b"hello world\n" * 20, b"\x00" * 64, b"%PDF-1.4\n" + b"x" * 100])
def test_not_an_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    _assert_image_error(path)
    assert not is_image_file(path)


def test_heic_without_its_plugin_says_which_plugin(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.HEIC"  # what an iPhone saves; Pillow alone cannot read it
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    error = _assert_image_error(path, match="pillow-heif")
    assert "not an image, or a format Pillow cannot read" in str(error)
    other = tmp_path / "fake.jpg"
    other.write_bytes(b"hello world\n" * 20)
    assert "pillow-heif" not in str(_assert_image_error(other))


def test_installed_heif_plugin_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """With pillow-heif installed, Pillow is told to open HEIC before the first image is loaded."""
    import types

    from vit_explain.runtime import images

    calls = []
    monkeypatch.setitem(sys.modules, "pillow_heif", types.SimpleNamespace(register_heif_opener=lambda: calls.append(1)))
    monkeypatch.setattr(images, "_formats", None)
    assert images._allowed_formats()
    assert calls == [1]


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_is_an_error(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cut.{fmt.lower()}"
    _noise(200, 150).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert is_image_file(path)  # the header is intact: only decoding fails
    _assert_image_error(path)


def test_eps_is_not_interpreted(tmp_path: Path) -> None:
    path = tmp_path / "x.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _assert_image_error(path)
    assert not is_image_file(path)


def test_is_image_file_ignores_extension(tmp_path: Path) -> None:
    disguised = tmp_path / "photo.txt"
    Image.new("RGB", (4, 4)).save(disguised, format="PNG")
    assert is_image_file(disguised)
    assert not is_image_file(tmp_path / "missing.jpg")
    assert not is_image_file(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_no_leaked_file_handles(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    _noise(64, 48).save(good)
    cut = tmp_path / "cut.png"
    _noise(64, 48).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    bomb = tmp_path / "bomb.png"
    _png_declaring(bomb, 100_000, 100_000)

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        load_image(good)
        is_image_file(good)
        for bad in (cut, bomb):
            with pytest.raises(ImageError):
                load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_imports_no_torch() -> None:
    code = (
        "import sys, vit_explain.runtime.images, vit_explain.runtime.preprocess; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_animated_image_records_a_first_frame_notice(tmp_path: Path) -> None:
    from vit_explain.runtime.images import NOTICE_KEY, input_notices

    frames = [Image.new("RGB", (240, 240), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image = load_image(tmp_path / "anim.gif")
    assert image.getpixel((0, 0)) == (255, 0, 0)  # the first frame
    assert image.info[NOTICE_KEY] == ("animated image (3 frames): the first frame is explained",)
    assert input_notices(image, (224, 224)) == ["animated image (3 frames): the first frame is explained"]
    frames[0].save(tmp_path / "still.gif")
    assert input_notices(load_image(tmp_path / "still.gif"), (224, 224)) == []


@pytest.mark.parametrize("size, model_size, expected", [
    ((40, 30), (224, 224), "40x30 is far smaller than the model's 224x224 input: upscaled about 7x"),
    ((112, 300), (224, 224), "112x300 is far smaller than the model's 224x224 input: upscaled about 2x"),
    ((113, 300), (224, 224), None),  # less than twice: no notice
    ((70, 200), (96, 128), None),  # model size is (height, width)
    ((63, 200), (96, 128), "63x200 is far smaller than the model's 128x96 input: upscaled about 2x"),
])
def test_far_smaller_image_gets_an_upscaling_notice(size, model_size, expected) -> None:
    from vit_explain.runtime.images import input_notices

    notices = input_notices(Image.new("RGB", size), model_size)
    assert notices == ([] if expected is None else [expected])
