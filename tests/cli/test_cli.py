"""The ``vit-explain`` CLI as a user with a folder of ten thousand images meets it.

One small random DeiT (depth 2, 14x14 grid, 1000 classes) is exported once for this module;
every other test runs the CLI on it, in-process with click's ``CliRunner`` where that is
enough, and as real processes where it is not (a SIGKILL part-way through a run, a TTY).

What "whole outputs" means throughout (:func:`assert_whole_outputs`): the overlay PNG opens,
decodes and has the image's upright size, the ``.npy`` loads (no pickle) with the model's grid
shape and is scaled to max 1, and the JSON parses and has the predictions and settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

import vit_explain
from vit_explain.cli import main

PACKAGE_ROOT = Path(vit_explain.__file__).resolve().parents[1]  # subprocesses run the code under test
MODEL_NAME = "deit_tiny_patch16_224"
GRID = (14, 14)
SUMMARY = re.compile(r"(\d+) done, (\d+) skipped, (\d+) failed")


# --------------------------------------------------------------------------- #
# The model, exported once per module
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from vit_explain.export import ModelSpec, export_model

    torch.manual_seed(0)
    model = timm.create_model(MODEL_NAME, pretrained=False, depth=2)
    path = tmp_path_factory.mktemp("cli-model") / f"{MODEL_NAME}.onnx"
    export_model(ModelSpec(MODEL_NAME, weights="random"), path, model=model)
    return path


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def cli(*args, env: dict | None = None):
    """Run the CLI in-process; stdout and stderr are kept apart (click >= 8.2)."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    if result.exception is not None:  # sys.exit() is how click reports exit codes
        assert isinstance(result.exception, SystemExit), repr(result.exception)


def summary(text: str) -> tuple[int, int, int]:
    """(done, skipped, failed) from the run's summary line."""
    found = SUMMARY.findall(text)
    assert len(found) == 1, f"expected one summary line in:\n{text}"
    return tuple(int(n) for n in found[0])


def smooth_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A blurry random picture: different per seed, quick to encode even when huge."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = small.resize((width, height), Image.Resampling.BILINEAR)
    return image if mode == "RGB" else image.convert(mode)


def save_image(path: Path, width: int = 64, height: int = 48, seed: int = 0, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    smooth_image(width, height, seed).save(path, format=fmt, **kwargs)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_raw_png(path: Path, width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> Path:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, and bombs must not be decoded)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def write_bomb(path: Path) -> Path:
    """A 100-byte PNG declaring 20000 x 20000 pixels: a decompression bomb."""
    return write_raw_png(path, 20000, 20000, 8, 0, b"\0" * 64)


def write_rgb48_png(path: Path, width: int = 30, height: int = 20) -> Path:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (height, width, 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)
    return write_raw_png(path, width, height, 16, 2, raw)


def upright_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).size


def outputs_of(out_dir: Path, source: Path) -> list[dict]:
    """Every output JSON under ``out_dir`` whose recorded source is ``source``."""
    found = []
    for file in out_dir.rglob("*.json"):
        data = json.loads(file.read_text(encoding="utf-8"))
        if Path(data["source"]).resolve() == source.resolve():
            found.append({"path": file, **data})
    return found


def assert_whole_png(path: Path, size: tuple[int, int] | None = None) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size, f"{path}: {image.size} != {size}"


def assert_whole_npy(path: Path) -> np.ndarray:
    mask = np.load(path, allow_pickle=False)
    assert mask.shape == GRID and mask.dtype == np.float32, (path, mask.shape, mask.dtype)
    assert np.isfinite(mask).all() and mask.min() >= 0 and np.isclose(mask.max(), 1.0)
    return mask


def assert_whole_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data["predictions"]) == 5
    assert {"index", "name", "probability"} <= set(data["predictions"][0])
    assert {"method", "head_fusion", "discard_ratio"} <= set(data["settings"])
    assert data["grid_size"] == list(GRID)
    assert data["maps"]
    return data


def assert_whole_outputs(out_dir: Path, source: Path, formats=("png", "npy", "json")) -> dict:
    """The one JSON recording ``source``, with every file it names whole (see module docstring)."""
    records = outputs_of(out_dir, source)
    assert len(records) == 1, f"{source}: {len(records)} output JSONs"
    data = assert_whole_json(records[0]["path"])
    assert tuple(data["image_size"]) == upright_size(source)
    folder = records[0]["path"].parent
    for entry in data["maps"]:
        if "png" in formats:
            assert_whole_png(folder / entry["overlay"], upright_size(source))
        if "npy" in formats:
            assert_whole_npy(folder / entry["mask"])
    return data


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_inside(out_dir: Path) -> None:
    root = out_dir.resolve()
    for file in files_under(out_dir):
        assert file.resolve().is_relative_to(root), file


# --------------------------------------------------------------------------- #
# Inputs: files, folders, globs, content sniffing, names
# --------------------------------------------------------------------------- #


def test_folder_is_recursive_and_finds_images_by_content(tmp_path, model_path):
    photos = tmp_path / "photos"
    images = [
        save_image(photos / "a" / "cat.png", seed=1),
        save_image(photos / "b" / "cat.png", seed=2),
        save_image(photos / "a" / "cat.jpg", seed=3),  # same stem, other extension
        save_image(photos / "a" / "photo.dat", seed=4, fmt="JPEG"),  # a JPEG by content
        save_image(photos / "deep" / "er" / "still" / "x.webp", seed=5),
    ]
    (photos / "a" / "notes.png").write_text("not a picture\n")  # text with an image name
    (photos / "README").write_text("hello\n")
    out = photos / "out"  # inside the input folder: a rerun must not explain its own overlays

    result = cli("explain", photos, "--model", model_path, "-o", out)
    assert_no_traceback(result)
    done, skipped, failed = summary(result.stderr)
    assert (done, skipped) == (len(images), 0)
    if result.exit_code != 0:  # notes.png may be reported, never fatal and never silent then
        assert result.exit_code == 1 and failed == 1 and "notes.png" in result.stderr
    for image in images:
        assert_whole_outputs(out, image)
    assert not outputs_of(out, photos / "a" / "notes.png")
    # same-named files in different folders (and cat.png / cat.jpg) got distinct outputs
    assert len(list(out.rglob("*.json"))) == len(images)

    again = cli("explain", photos, "--model", model_path, "-o", out)
    assert summary(again.stderr)[:2] == (0, len(images))  # resumed, overlays not taken as inputs


def test_explicit_files_and_globs_with_same_names(tmp_path, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = save_image(Path("in/a/cat.png"), seed=1)
    b = save_image(Path("in/b/cat.png"), seed=2)
    c = save_image(Path("in/b/CAT.png"), seed=3)  # differs only in case: clashes on macOS/Windows
    save_image(Path("in/a/dog.jpg"), seed=4)

    result = cli("explain", a, b, c, "--model", model_path, "-o", "files")
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (3, 0, 0)
    for image in (a, b, c):
        assert_whole_outputs(Path("files"), image)
    assert len(list(Path("files").rglob("*.png"))) == 3

    # the pattern is expanded by vit-explain itself (quoted in a shell, or on Windows)
    result = cli("explain", "in/*/cat.png", "in/**/*.jpg", "--model", model_path, "-o", "globbed")
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (3, 0, 0)
    for image in (a, b, Path("in/a/dog.jpg")):
        assert_whole_outputs(Path("globbed"), image)

    result = cli("explain", "in/*/nothing*.png", "--model", model_path, "-o", "none")
    assert result.exit_code == 1
    assert "no files match" in result.stderr and "Error: no images to explain" in result.stderr
    assert_no_traceback(result)


def test_outputs_cannot_escape_the_output_dir(tmp_path, model_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    images = tmp_path / "work" / "imgs"
    hostile = [
        save_image(images / "..png", seed=1, fmt="PNG"),
        save_image(images / "con.png", seed=2),
        save_image(images / "a:b?c*.png", seed=3),
        save_image(images / " -dash.png", seed=4),
        save_image(images / "sub" / "..." / "x.png", seed=5),
    ]
    before = {p for p in files_under(tmp_path)}
    # hidden files and folders ("..png", "...") are skipped by folder walks and globs: named explicitly here
    result = cli("explain", "../imgs", "../imgs/*.png", "../imgs/sub/.../x.png", "../imgs/..png",
                 "--model", model_path, "-o", "out")
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (len(hostile), 0, 0)
    out = work / "out"
    assert_inside(out)
    new_elsewhere = {p for p in files_under(tmp_path) if not p.is_relative_to(out)} - before
    assert not new_elsewhere
    for image in hostile:
        assert_whole_outputs(out, image)


def test_symlinked_folder_in_output_dir_fails_that_image_only(tmp_path, model_path):
    save_image(tmp_path / "a" / "cat.png", seed=1)
    good = save_image(tmp_path / "b" / "dog.png", seed=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(elsewhere, target_is_directory=True)  # outputs of folder "a" would land outside

    result = cli("explain", tmp_path / "a", tmp_path / "b", "--model", model_path, "-o", out)
    assert not any(elsewhere.iterdir())  # holds today: output_stem refuses
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert summary(result.stderr) == (1, 0, 1)
    assert "cat.png" in result.stderr and "outside the output folder" in result.stderr
    assert_whole_outputs(out, good)


# --------------------------------------------------------------------------- #
# Every kind of image Pillow reads
# --------------------------------------------------------------------------- #


def test_every_image_mode_end_to_end(tmp_path, model_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    base = smooth_image(60, 40, seed=7)
    base.convert("L").save(folder / "gray.png")
    base.convert("LA").save(folder / "gray_alpha.png")
    base.convert("1").save(folder / "bilevel.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    transparent_palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette.save(folder / "palette_transparency.gif", transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.linspace(0, 65535, 60 * 40, dtype=np.uint16).reshape(40, 60)).save(folder / "gray16.png")
    write_rgb48_png(folder / "rgb48.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    for orientation in (6, 8, 3):  # rotated 90 / 270 / 180 degrees
        exif = Image.Exif()
        exif[0x0112] = orientation
        base.save(folder / f"exif{orientation}.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    Image.new("RGB", (3, 5), (30, 200, 30)).save(folder / "three_by_five.png")
    base.save(folder / "plain.bmp")
    base.save(folder / "plain.tiff")
    base.save(folder / "plain.webp")
    Image.fromarray(np.linspace(0, 1, 60 * 40, dtype=np.float32).reshape(40, 60)).save(folder / "float.tiff")

    assert Image.open(folder / "gray16.png").mode.startswith("I")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert upright_size(folder / "exif6.jpg") == (40, 60)

    out = tmp_path / "out"
    result = cli("explain", folder, "--model", model_path, "-o", out, "-q")
    count = len(list(folder.iterdir()))
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (count, 0, 0)
    for image in folder.iterdir():
        assert_whole_outputs(out, image)  # overlay at the upright size (exif6/exif8: 40x60)


def test_very_large_jpeg(tmp_path, model_path):
    big = save_image(tmp_path / "big.jpg", 6000, 4000, seed=3, quality=80)
    out = tmp_path / "out"
    result = cli("explain", big, "--model", model_path, "-o", out, "--format", "png", "--format", "json")
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (1, 0, 0)
    assert_whole_outputs(out, big, formats=("png", "json"))


# --------------------------------------------------------------------------- #
# One bad file never sinks the rest
# --------------------------------------------------------------------------- #


def _bad_files(folder: Path) -> dict[Path, str]:
    """Bad inputs and a word their failure message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good_png = save_image(folder / "source.png", 80, 60, seed=9)
    data = good_png.read_bytes()
    good_png.unlink()
    truncated = folder / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "text.jpg"
    text.write_text("this is not a jpeg\n")
    return {truncated: "truncated", empty: "empty", text: "not an image", write_bomb(folder / "bomb.png"): "bomb"}


def test_bad_files_are_reported_and_the_others_are_whole(tmp_path, model_path):
    bad = _bad_files(tmp_path / "bad")
    good = [save_image(tmp_path / "good" / f"g{i}.png", 70 + i, 50, seed=i) for i in range(3)]
    inputs = [good[0], *bad, good[1], good[2]]  # bad files in the middle of batches
    out = tmp_path / "out"
    result = cli("explain", *inputs, "--model", model_path, "-o", out, "--batch-size", "2")
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert summary(result.stderr) == (3, 0, 4)
    lines = result.stderr.splitlines()
    for path, reason in bad.items():
        mentions = [line for line in lines if str(path) in line]
        assert len(mentions) == 1 and reason in mentions[0], (path, reason, result.stderr)
        assert not outputs_of(out, path)
    for image in good:
        assert_whole_outputs(out, image)
    assert result.stdout == ""


def test_bad_files_inside_a_folder(tmp_path, model_path):
    folder = tmp_path / "mixed"
    bad = _bad_files(folder)
    good = [save_image(folder / f"g{i}.png", seed=i) for i in range(2)]
    out = tmp_path / "out"
    result = cli("explain", folder, "--model", model_path, "-o", out)
    assert_no_traceback(result)
    assert result.exit_code == 1
    done, skipped, failed = summary(result.stderr)
    assert (done, skipped) == (2, 0)
    # every bad file has a photo's name, so every one is taken and reported with its reason (an
    # empty or text "JPEG" in a folder of photos is a broken photo, not something to leave out)
    for path, reason in bad.items():
        assert any(str(path) in line and reason in line for line in result.stderr.splitlines()), result.stderr
    assert failed == len(bad)
    for image in good:
        assert_whole_outputs(out, image)


# --------------------------------------------------------------------------- #
# Atomic outputs and resume, with a real process killed part-way
# --------------------------------------------------------------------------- #


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def _explain_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "vit_explain.cli", "explain", *map(str, args)]


def _check_no_half_files(out: Path) -> tuple[set[Path], list[Path]]:
    """Every final-named file opens; returns (completed JSONs, leftover temp files)."""
    jsons, temps = set(), []
    for file in files_under(out):
        if file.name.startswith("."):
            assert re.fullmatch(r"\..+\.tmp", file.name), file
            temps.append(file)
        elif file.suffix == ".png":
            assert_whole_png(file)
        elif file.suffix == ".npy":
            assert_whole_npy(file)
        elif file.suffix == ".json":
            data = assert_whole_json(file)
            for entry in data["maps"]:  # the JSON is written last: its image is complete
                assert_whole_png(file.parent / entry["overlay"], tuple(data["image_size"]))
                assert_whole_npy(file.parent / entry["mask"])
            jsons.add(file)
        else:
            pytest.fail(f"unexpected output {file}")
    return jsons, temps


def _start_and_stop(args, out: Path, sig: int, min_done: int, cwd: Path) -> tuple[int, str]:
    """Start ``vit-explain explain`` and send ``sig`` once ``min_done`` images are complete,
    preferably while a temp file is being written. Returns (exit status, stderr)."""
    proc = subprocess.Popen(_explain_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_subprocess_env(), cwd=cwd)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        names = [entry.name for folder in (out, *out.glob("*")) if folder.is_dir() for entry in os.scandir(folder)]
        done = sum(name.endswith(".json") for name in names)
        if done >= min_done + 12 or (done >= min_done and any(n.endswith(".tmp") for n in names)):
            break
        time.sleep(0.001)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1].decode()
    return proc.returncode, stderr


def test_interrupted_and_killed_runs_leave_no_half_files_and_resume(tmp_path, model_path):
    folder = tmp_path / "many"
    total = 40
    for i in range(total):
        save_image(folder / f"img{i:02d}.jpg", 400, 300, seed=i)
    out = tmp_path / "out"
    args = (folder, "--model", model_path, "-o", out, "--batch-size", "2", "--threads", "1")

    # Ctrl-C: one "interrupted" line, exit code 130, no traceback, no half files. The temp file being written is
    # normally removed, but not always: a KeyboardInterrupt landing between the temp file's
    # creation and atomic_writer's try (files.py) leaves an empty hidden one (about 1 run in 8
    # here, as this test signals right when a temp file appears; see the report)
    code, stderr = _start_and_stop(args, out, signal.SIGINT, 3, tmp_path)
    assert code == 130 and stderr.splitlines()[-1].startswith("interrupted: ") and "Traceback" not in stderr, (code, stderr)
    interrupted, interrupted_temps = _check_no_half_files(out)
    assert len(interrupted_temps) <= 1
    assert 3 <= len(interrupted) < total

    # SIGKILL (power cut, OOM killer): nothing can clean up, yet no final-named file is partial
    code, stderr = _start_and_stop(args, out, signal.SIGKILL, len(interrupted) + 3, tmp_path)
    assert code == -signal.SIGKILL, f"the run ended before it was killed: {stderr}"
    complete, temps = _check_no_half_files(out)
    assert len(interrupted) + 3 <= len(complete) < total
    assert set(interrupted_temps) <= set(temps)  # the killed run did not clean up the earlier one
    finished = {p: p.stat().st_mtime_ns for json_file in complete for p in json_file.parent.glob(
        json_file.name.removesuffix(".rollout.json") + ".*") if not p.name.startswith(".")}

    # rerun, as a real process whose stderr is a pipe: no progress bar, just the summary
    rerun = subprocess.run(_explain_cmd(*args), capture_output=True, text=True, env=_subprocess_env(),
                           cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stderr) == (total - len(complete), len(complete), 0)
    assert rerun.stderr.splitlines()[0] == f"{len(complete)} already done with the same settings; --overwrite redoes them"
    assert len(rerun.stderr.splitlines()) == 2, rerun.stderr
    assert "\r" not in rerun.stderr and rerun.stdout == ""
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished images not redone
    complete_after, temps_after = _check_no_half_files(out)
    assert len(complete_after) == total
    # temp files a kill left behind are hidden, never taken for outputs or inputs; the rerun
    # makes no new ones (today it does not delete the old ones either: see the report)
    assert set(temps_after) <= set(temps)
    for image in folder.iterdir():
        assert_whole_outputs(out, image)

    redo = cli(*_explain_cmd(*args, "--overwrite")[3:])
    assert redo.exit_code == 0, redo.output
    assert summary(redo.stderr) == (total, 0, 0)
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in finished.items())
    _check_no_half_files(out)


def test_rerun_with_another_model_does_not_skip(tmp_path, model_path):
    import onnx

    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model_path))
    for prop in proto.metadata_props:
        if prop.key == "vit_explain":
            meta = json.loads(prop.value)
            meta["weights"], meta["weights_sha256"] = "finetuned.safetensors", "0" * 64
            prop.value = json.dumps(meta)
    onnx.save(proto, str(other))
    image = save_image(tmp_path / "cat.png")
    out = tmp_path / "out"
    assert cli("explain", image, "--model", model_path, "-o", out).exit_code == 0
    result = cli("explain", image, "--model", other, "-o", out)
    assert result.exit_code == 0, result.output
    assert summary(result.stderr) == (1, 0, 0)
    assert assert_whole_outputs(out, image)["model"]["weights"] == "finetuned.safetensors"


# --------------------------------------------------------------------------- #
# Model files that are not vit-explain exports
# --------------------------------------------------------------------------- #


def _bad_model(kind: str, model_path: Path, folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    path = folder / f"{kind}.onnx"
    if kind == "foreign":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
        onnx.save(helper.make_model(graph), str(path))
    elif kind == "truncated":
        data = model_path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "text":
        path.write_text("definitely not a model\n")
    elif kind == "newer":
        proto = onnx.load(str(model_path))
        for prop in proto.metadata_props:
            if prop.key == "vit_explain":
                meta = json.loads(prop.value)
                meta["format_version"] = 99
                prop.value = json.dumps(meta)
        onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("kind, words", [
    ("foreign", "not a vit-explain export"),
    ("truncated", "not a readable ONNX model"),
    ("text", "not a readable ONNX model"),
    ("newer", "format version 99"),
])
def test_bad_model_file_is_one_error_line(tmp_path, model_path, kind, words):
    bad = _bad_model(kind, model_path, tmp_path)
    image = save_image(tmp_path / "cat.png")
    for args in (("explain", image, "--model", bad, "-o", tmp_path / "out"), ("info", bad)):
        result = cli(*args)
        assert_no_traceback(result)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# Bad options: click usage errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("options, option_name", [
    (["--category-index", "1000"], "--category-index"),
    (["--category-index", "-1"], "--category-index"),
    (["--discard-ratio", "1.0"], "--discard-ratio"),
    (["--discard-ratio", "-0.1"], "--discard-ratio"),
    (["--head-fusion", "median"], "--head-fusion"),
    (["--method", "nope"], "--method"),
    (["--method", "rollout", "--category-index", "3"], "--method"),
    (["--colormap", "notacolormap"], "--colormap"),
    (["--alpha", "2"], "--alpha"),
    (["--batch-size", "0"], "--batch-size"),
    (["--start-layer", "2"], "--start-layer"),  # the model has 2 layers
    (["--method", "gae", "--head-fusion", "max"], "--method"),  # a flag the method does not use
])
def test_bad_explain_options_are_usage_errors(tmp_path, model_path, options, option_name):
    image = save_image(tmp_path / "cat.png")
    out = tmp_path / "out"
    result = cli("explain", image, "--model", model_path, "-o", out, *options)
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option_name in errors[0], result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- #
# What is written, and how it looks
# --------------------------------------------------------------------------- #


def test_format_npy_only(tmp_path, model_path):
    image = save_image(tmp_path / "cat.png")
    out = tmp_path / "out"
    result = cli("explain", image, "--model", model_path, "-o", out, "--format", "npy")
    assert result.exit_code == 0, result.output
    files = files_under(out)
    assert [f.name for f in files] == ["cat_png.rollout.npy"]
    assert_whole_npy(files[0])
    assert summary(cli("explain", image, "--model", model_path, "-o", out, "--format", "npy").stderr) == (0, 1, 0)


def _overlay(tmp_path: Path, model_path: Path, image: Path, name: str, *options) -> np.ndarray:
    out = tmp_path / name
    result = cli("explain", image, "--model", model_path, "-o", out, "--format", "png", *options)
    assert result.exit_code == 0, result.output
    (png,) = out.rglob("*.png")
    with Image.open(png) as overlay_image:
        return np.asarray(overlay_image.convert("RGB"), dtype=np.int16)


def test_colormap_and_alpha_change_the_overlay(tmp_path, model_path):
    image = save_image(tmp_path / "cat.png", 96, 64, seed=3)
    original = np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)
    jet = _overlay(tmp_path, model_path, image, "jet")
    viridis = _overlay(tmp_path, model_path, image, "viridis", "--colormap", "viridis")
    invisible = _overlay(tmp_path, model_path, image, "alpha0", "--alpha", "0")
    only_heat = _overlay(tmp_path, model_path, image, "alpha1", "--alpha", "1")
    assert jet.shape == viridis.shape == original.shape
    assert np.abs(jet - viridis).mean() > 5
    # no heat map at all where the model looked (DeiT, crop_pct 0.9: the crop is x 19..76, y 3..60
    # of this 96x64 photo); outside it the overlay greys out what the model never saw
    seen = (slice(3, 61), slice(19, 77))
    assert np.abs(invisible[seen] - original[seen]).max() <= 1
    assert (invisible[:, :18, 0] == invisible[:, :18, 2]).all()
    assert np.abs(only_heat - jet).mean() > 5
    # alpha 1 is the heat map alone: it does not depend on the photo
    other = save_image(tmp_path / "other.png", 96, 64, seed=4)
    assert np.abs(only_heat - original).mean() > 5 and np.abs(_overlay(
        tmp_path, model_path, other, "alpha1-other", "--alpha", "1") - np.asarray(Image.open(other).convert("RGB"))).mean() > 5


def test_one_map_per_category(tmp_path, model_path):
    image = save_image(tmp_path / "cat.png")
    out = tmp_path / "out"
    result = cli("explain", image, "--model", model_path, "-o", out, "--category-index", "3", "--category-index", "999")
    assert result.exit_code == 0, result.output
    data = assert_whole_outputs(out, image)
    assert data["settings"]["method"] == "grad_rollout" and data["settings"]["head_fusion"] == "mean"
    assert [(m["label"], m["category_index"]) for m in data["maps"]] == [("grad_rollout.3", 3), ("grad_rollout.999", 999)]
    assert data["maps"][0]["category_name"].startswith("tiger shark")
    masks = [np.load(out / m["mask"]) for m in data["maps"]]
    assert not np.allclose(masks[0], masks[1])
    assert sorted(f.name for f in files_under(out)) == [
        "cat_png.grad_rollout.3.npy", "cat_png.grad_rollout.3.png", "cat_png.grad_rollout.999.npy",
        "cat_png.grad_rollout.999.png", "cat_png.grad_rollout.json",
    ]


def test_grad_rollout_without_category_explains_top1(tmp_path, model_path):
    images = [save_image(tmp_path / f"img{i}.png", seed=i) for i in range(3)]
    out = tmp_path / "out"
    result = cli("explain", *images, "--model", model_path, "-o", out, "--method", "grad_rollout")
    assert result.exit_code == 0, result.output
    for image in images:
        data = assert_whole_outputs(out, image)
        (entry,) = data["maps"]
        assert entry["label"] == "grad_rollout.top1"
        assert entry["category_index"] == data["predictions"][0]["index"]
    top1 = np.load(next(out.glob("img0_png.grad_rollout.top1.npy")))
    explicit = tmp_path / "explicit"
    index = json.loads(next(out.glob("img0_png*.json")).read_text())["predictions"][0]["index"]
    assert cli("explain", images[0], "--model", model_path, "-o", explicit, "--category-index", index).exit_code == 0
    np.testing.assert_allclose(np.load(next(explicit.glob("*.npy"))), top1, atol=1e-6)


# --------------------------------------------------------------------------- #
# --model NAME and the cache
# --------------------------------------------------------------------------- #


def _offline(monkeypatch) -> None:
    """Fail fast like a machine without network: no Hugging Face retries for a minute."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_model_name_not_exported_fails_clearly_offline(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    _offline(monkeypatch)
    cache = tmp_path / "cache"
    image = save_image(tmp_path / "cat.png")
    result = cli("explain", image, "--model", "vit_tiny_patch16_224", "-o", tmp_path / "out",
                 env={"VIT_EXPLAIN_CACHE": str(cache)})
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    assert f"exporting vit_tiny_patch16_224 to {cache / 'vit_tiny_patch16_224.onnx'}" in result.stderr
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "pretrained weights" in errors[0] and "--weights PATH" in errors[0]
    assert not (cache / "vit_tiny_patch16_224.onnx").exists()
    assert not cache.exists() or not any(cache.iterdir())  # no half-written model either


def test_model_name_reuses_the_cached_export(tmp_path, model_path, monkeypatch):
    import vit_explain.export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(vit_explain.export, "export_model", no_export)
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / f"{MODEL_NAME}.onnx"
    shutil.copy(model_path, cached)
    image = save_image(tmp_path / "cat.png")
    env = {"VIT_EXPLAIN_CACHE": str(cache)}
    for name, extra in (("by-name", ["--model", MODEL_NAME]), ("default", [])):
        out = tmp_path / name
        result = cli("explain", image, "-o", out, *extra, env=env)
        assert result.exit_code == 0, result.output
        assert "exporting" not in result.output
        assert assert_whole_outputs(out, image)["model"]["file"] == str(cached)


# --------------------------------------------------------------------------- #
# --report
# --------------------------------------------------------------------------- #


def _not_blank(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 10, f"{path} looks blank"
    return pixels


def test_report_lists_done_and_failed_images(tmp_path, model_path):
    images = [save_image(tmp_path / "in" / f"photo{i}.png", 120, 90, seed=i) for i in range(2)]
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_text("no jpeg here")
    out = tmp_path / "out"
    result = cli("explain", images[0], broken, images[1], "--model", model_path, "-o", out, "--report")
    assert_no_traceback(result)
    assert result.exit_code == 1 and summary(result.stderr) == (2, 0, 1)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "broken.jpg" in html and "not an image" in html
    assert all(str(image) in html for image in images)
    assert html.count("<img") >= 4  # a thumbnail and an overlay per explained image
    sheet = _not_blank(out / "contact_sheet.png")
    assert sheet.shape[0] > 200

    # a resumed run still reports every image (rebuilt from the files on disk)
    again = cli("explain", *images, "--model", model_path, "-o", out, "--report")
    assert again.exit_code == 0 and summary(again.stderr) == (0, 2, 0)
    assert all(str(image) in (out / "report.html").read_text(encoding="utf-8") for image in images)
    assert cli("explain", images[0], broken, images[1], "--model", model_path, "-o", out, "--report").exit_code == 1

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed: the report was not rendered")
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
         f"--screenshot={shot}", "--window-size=1200,900", (out / "report.html").resolve().as_uri()],
        capture_output=True, timeout=90, check=False,
    )
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = _not_blank(shot)
    # the failed row is drawn in the report's error colours (red text on a pink row)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 80)
    assert red.sum() > 200


def test_report_lists_inputs_that_were_not_found(tmp_path, model_path):
    image = save_image(tmp_path / "cat.png")
    missing = tmp_path / "typo.png"
    out = tmp_path / "out"
    result = cli("explain", image, missing, "--model", model_path, "-o", out, "--report")
    assert result.exit_code == 1 and summary(result.stderr) == (1, 0, 1)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "typo.png" in html and "no such file" in html


# --------------------------------------------------------------------------- #
# Progress and quiet
# --------------------------------------------------------------------------- #


def test_quiet_prints_only_the_summary(tmp_path, model_path):
    images = [save_image(tmp_path / f"img{i}.png", seed=i) for i in range(3)]
    result = cli("explain", *images, "--model", model_path, "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert summary(line) == (3, 0, 0)


def test_no_progress_bar_without_a_tty(tmp_path, model_path):
    images = [save_image(tmp_path / f"img{i}.png", 240, 180, seed=i) for i in range(3)]  # no upscaling notice
    result = cli("explain", *images, "--model", model_path, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert "\r" not in result.output and "%|" not in result.output
    assert [SUMMARY.search(line) is not None for line in result.stderr.splitlines()] == [True]


def test_progress_bar_on_a_tty(tmp_path, model_path):
    images = [save_image(tmp_path / f"img{i}.png", seed=i) for i in range(3)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(_explain_cmd(*images, "--model", model_path, "-o", tmp_path / "out"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=_subprocess_env())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.kill() if proc.poll() is None else None
        proc.wait()
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "\r" in text and "3/3" in text and "img" in text  # tqdm's bar
    assert summary(text) == (3, 0, 0)


# --------------------------------------------------------------------------- #
# info and export
# --------------------------------------------------------------------------- #


def test_info_describes_the_model(model_path):
    result = cli("info", model_path)
    assert result.exit_code == 0, result.output
    fields = dict(re.match(r"\s*([^:]+):\s(.*)", line).groups() for line in result.stdout.splitlines())
    assert fields["source model"] == MODEL_NAME
    assert fields["input size"] == "224x224"
    assert fields["patch grid"] == "14x14"
    assert fields["prefix tokens"] == "1"
    assert fields["outputs"] == "1000 classes"
    assert fields["class names"].startswith("tench, Tinca tinca") and fields["class names"].endswith("(1000)")
    assert fields["layers"] == "2"
    # the file's own hash, what `sha256sum` prints and a download page publishes
    assert fields["file sha256"] == __import__("hashlib").sha256(model_path.read_bytes()).hexdigest()


def test_info_usage_errors(tmp_path):
    result = cli("info", tmp_path / "missing.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("args, code, words", [
    (["--weights", "/nonexistent"], 2, "--weights"),
    (["--img-size", "0"], 2, "--img-size"),
    (["--img-size", "abc"], 2, "--img-size"),
    (["--img-size", "224x"], 2, "--img-size"),
    (["--num-classes", "-1"], 2, "--num-classes"),
    (["--opset", "5"], 2, "--opset"),
])
def test_export_bad_arguments_are_usage_errors(tmp_path, monkeypatch, args, code, words):
    monkeypatch.chdir(tmp_path)
    result = cli("export", MODEL_NAME, *args)
    assert_no_traceback(result)
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_export_unknown_model(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    result = cli("export", "not_a_vit_at_all", "--weights", "random")
    assert_no_traceback(result)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: unknown timm model 'not_a_vit_at_all'")
    assert not any(tmp_path.iterdir())


def test_export_pretrained_offline_names_weights_path(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["-o", "explicit/model.onnx"]):
        result = cli("export", MODEL_NAME, "--weights", "pretrained", *extra)
        assert_no_traceback(result)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "--weights PATH" in errors[0], result.stderr
        assert result.stdout == ""
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_cli_reads_the_method_registry_without_numpy():
    """The CLI's choices are the registry's, and reading it imports no numpy (--help stays fast)."""
    code = (
        "import sys, vit_explain.cli.explain as c, vit_explain.methods as m; "
        "print(c.METHOD_NAMES == m.METHOD_NAMES, 'numpy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]


# --------------------------------------------------------------------------- #
# The first run: inputs before the model, messages whose commands run as written
# --------------------------------------------------------------------------- #


def _record_exports(monkeypatch) -> list:
    """Make ``vit-explain export`` record what it would export instead of exporting (torch-free)."""
    import vit_explain.export

    calls = []

    def fake_export(spec, output, **kwargs):
        calls.append((spec, Path(output)))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"")
        return type("Result", (), {"path": Path(output)})()

    monkeypatch.setattr(vit_explain.export, "export_model", fake_export)
    return calls


def _run_suggestion(message: str, checkpoint: Path, monkeypatch) -> Path:
    """Run the ``vit-explain export ...`` a message suggests (PATH / MODEL_NAME filled in) and
    return the file its ``--model`` part names: the export writes exactly that file."""
    import shlex

    command = re.search(r"vit-explain (export [^,(]+)", message).group(1)
    argv = shlex.split(command.replace("PATH", shlex.quote(str(checkpoint))).replace("MODEL_NAME", MODEL_NAME))
    calls = _record_exports(monkeypatch)
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    model_file = Path(shlex.split(re.search(r"--model (.+)$", message).group(1))[0])
    assert len(calls) == 1 and calls[0][0].weights == str(checkpoint) and calls[0][1] == model_file
    return model_file


def test_missing_input_fails_before_the_model_is_resolved(tmp_path, monkeypatch):
    import vit_explain.model_store

    def no_model(*args, **kwargs):
        raise AssertionError("the model was resolved before the inputs were checked")

    monkeypatch.setattr(vit_explain.model_store, "resolve_model", no_model)
    result = cli("explain", tmp_path / "photo.jpg", "-o", tmp_path / "out")
    assert_no_traceback(result)
    assert result.exit_code == 1 and "Error: no images to explain" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_offline_message_suggests_commands_that_run(tmp_path, monkeypatch):
    """The default model offline (the hub is unreachable here): one instruction, export with
    local weights then --model that file, and both halves run as written."""
    pytest.importorskip("timm")
    _offline(monkeypatch)
    image = save_image(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    result = cli("explain", image, "-o", tmp_path / "out", env={"VIT_EXPLAIN_CACHE": str(tmp_path / "cache")})
    assert_no_traceback(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    # one instruction: --weights goes to export (explain has no such option), then --model FILE
    assert errors[0].count("--weights") == 1 and errors[0].count("vit-explain ") == 1, errors[0]
    checkpoint = tmp_path / "my weights.safetensors"
    checkpoint.write_bytes(b"x")
    model_file = _run_suggestion(errors[0], checkpoint, monkeypatch)
    assert model_file == Path(f"{MODEL_NAME}.onnx")


@pytest.mark.parametrize("name, content", [
    ("vit.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
    ("vit.pth", b"PK\x03\x04rest"),
    ("downloaded_weights", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}"),  # no suffix: by content
    ("old.bin", b"\x80\x02}q\x00."),
])
def test_checkpoint_given_as_model_says_how_to_export_it(tmp_path, monkeypatch, name, content):
    checkpoint = tmp_path / name
    checkpoint.write_bytes(content)
    image = save_image(tmp_path / "cat.png")
    for args in (("explain", image, "--model", checkpoint, "-o", tmp_path / "out"), ("info", checkpoint)):
        result = cli(*args)
        assert_no_traceback(result)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "is a PyTorch checkpoint, not an exported model" in lines[0] and "Wire format" not in lines[0]
    assert _run_suggestion(lines[0], checkpoint, monkeypatch) == checkpoint.with_suffix(".onnx")


def _no_work(monkeypatch) -> None:
    import vit_explain.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("images were explained although the output folder cannot be written")

    monkeypatch.setattr(vit_explain.pipeline, "explain_images", refuse)


def test_output_folder_in_a_file_is_one_line(tmp_path, model_path, monkeypatch):
    _no_work(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    image = save_image(tmp_path / "cat.png")
    result = cli("explain", image, "--model", model_path, "-o", blocker / "sub")
    assert_no_traceback(result)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines == [f"Error: cannot write to {blocker / 'sub'}: {blocker} is not a folder"]
    result = cli("explain", image, "--model", model_path, "-o", blocker)  # click's own check: a usage error
    assert_no_traceback(result)
    assert result.exit_code == 2 and len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


def test_full_or_forbidden_output_folder_is_one_line(tmp_path, model_path, monkeypatch):
    import errno

    import vit_explain.atomic

    _no_work(monkeypatch)
    image = save_image(tmp_path / "cat.png")
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        def failing(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(vit_explain.atomic.tempfile, "TemporaryFile", failing)  # the folder probe
        result = cli("explain", image, "--model", model_path, "-o", tmp_path / "out", "-q")
        assert_no_traceback(result)
        assert result.exit_code == 1 and result.output.strip() == f"Error: cannot write to {tmp_path / 'out'}: {os.strerror(code)}"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs, which refuses new folders")
def test_output_folder_the_system_refuses_is_one_line(tmp_path, model_path, monkeypatch):
    _no_work(monkeypatch)
    result = cli("explain", save_image(tmp_path / "cat.png"), "--model", model_path, "-o", "/sys/kernel/vit-explain-out")
    assert_no_traceback(result)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: cannot write to /sys/kernel/vit-explain-out")


def test_odd_inputs_are_explained_with_a_notice(tmp_path, model_path):
    frames = [smooth_image(300, 260, seed=s) for s in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    tiny = save_image(tmp_path / "tiny.png", 40, 30)
    normal = save_image(tmp_path / "normal.png", 300, 260)
    result = cli("explain", tmp_path / "anim.gif", tiny, normal, "--model", model_path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert f"{tmp_path / 'anim.gif'}: animated image (3 frames): the first frame is explained" in lines
    assert f"{tiny}: 40x30 is far smaller than the model's 224x224 input: upscaled about 7x" in lines
    assert not [line for line in lines if line.startswith(str(normal))]
    assert summary(result.stderr) == (3, 0, 0)
    quiet = cli("explain", tiny, "--model", model_path, "-o", tmp_path / "out2", "-q")
    assert quiet.stderr.splitlines() == [line for line in quiet.stderr.splitlines() if SUMMARY.search(line)]


def test_every_option_has_help_and_the_command_list_is_whole():
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, __import__("click").Option):
                assert param.help, f"{name} {param.opts} has no description"
    listing = cli("--help").stdout.split("Commands:")[1]
    for name, command in main.commands.items():
        first = " ".join(command.help.strip().splitlines()[0].split())
        assert first in " ".join(listing.split()).replace("- ", "-"), name
    assert "..." not in listing


def test_export_help_shows_the_real_default(tmp_path, monkeypatch):
    from vit_explain.export import ModelSpec, default_output_path

    text = " ".join(cli("export", "--help").stdout.split())
    assert "models/MODEL_NAME.onnx, with _HxW for --img-size and _random<seed> or _<checkpoint name> for --weights" in text
    assert default_output_path(ModelSpec(MODEL_NAME)) == Path(f"models/{MODEL_NAME}.onnx")
    random_spec = ModelSpec(MODEL_NAME, weights="random", img_size=(96, 128))
    assert default_output_path(random_spec) == Path(f"models/{MODEL_NAME}_96x128_random0.onnx")
