"""Time ``vit-explain explain`` on a folder of full-size photos, end to end (files in, files out).

    python benchmarks/cli_photos.py --model models/deit_tiny_patch16_224_random0.onnx --count 16 --size 2400x1800

The engine benchmark (``run.py``) stops at the masks. A user's run also decodes each photo and
writes an overlay PNG at the photo's own size, which for a 4-megapixel photo takes more than ten
times the graph call. The photos are made here: the images in ``--images`` (or random noise when
there are none) resized to ``--size`` with a little noise and saved as JPEG quality 90, so the
run is the same on any machine. Prints images per second and the time per stage of one photo.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit_explain.outputs import overlay  # noqa: E402
from vit_explain.runtime.images import load_image  # noqa: E402


def make_photos(folder: Path, count: int, size: tuple[int, int], sources: list[Path]) -> list[Path]:
    rng = np.random.default_rng(0)
    bases = [Image.open(p).convert("RGB") for p in sources] or [None]
    paths = []
    for index in range(count):
        base = bases[index % len(bases)]
        if base is None:
            pixels = rng.integers(0, 256, (size[1], size[0], 3))
        else:
            pixels = np.asarray(base.resize(size, Image.Resampling.BICUBIC)).astype(np.int16)
            pixels = pixels + rng.integers(-8, 8, pixels.shape)
        path = folder / f"photo{index:03d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def stage_times(photo: Path) -> dict[str, float]:
    """One photo's decode, overlay and PNG encode, in ms (the stages outside the engine)."""
    start = time.perf_counter()
    image = load_image(photo)
    decoded = time.perf_counter()
    painted = overlay(image, np.random.default_rng(1).random((14, 14)).astype(np.float32))
    drawn = time.perf_counter()
    painted.save(io.BytesIO(), format="PNG", compress_level=1)
    encoded = time.perf_counter()
    return {"decode": decoded - start, "overlay": drawn - decoded, "png": encoded - drawn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported .onnx file")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", default="2400x1800", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    sources = sorted(p for p in Path(args.images).glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "photos", Path(tmp) / "out"
        folder.mkdir()
        photos = make_photos(folder, args.count, (width, height), sources)
        command = [sys.executable, "-m", "vit_explain.cli", "explain", "-m", args.model, str(folder), "-o", str(out), "-q"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start
        stages = stage_times(photos[0])
        stages = stage_times(photos[0])  # the second call: matplotlib's import is not a photo's cost
    print(f"{args.count} photos of {width}x{height}: {elapsed:.1f} s, {args.count / elapsed:.2f} img/s "
          "(the whole command, model load included)")
    print("one photo, one thread: " + ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in stages.items()))


if __name__ == "__main__":
    main()
