"""Benchmark the runtime against the PyTorch reference and write ``benchmarks/results/results-<date>.md``.

    python benchmarks/run.py --model deit_tiny_patch16_224 --batch-sizes 1,8,32 --threads 2 --images ../shared/images

The model is exported with random weights (``models/<name>_random0.onnx``) when that file is
absent: there is no network here, and latency and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import PAUSE_S, format_table, machine_info, run_benchmark  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_photos(directory: Path, count: int = 8, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, blobs, texture noise), deterministic."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack(
            [
                128 + 100 * np.sin(x / (60 + 10 * i) + c) * np.cos(y / (80 + 7 * i) - c)
                for c in (0.0, 1.3, 2.6)
            ],
            axis=-1,
        )
        base += rng.normal(0, 12, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
            w, h = int(rng.integers(40, 250)), int(rng.integers(40, 200))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        path = directory / f"synthetic_{i:02d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def find_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def ensure_model(name: str, models_dir: Path) -> tuple[Path, bool]:
    path = models_dir / f"{name}_random0.onnx"
    if path.is_file():
        return path, False
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec

    log(f"exporting {name} with random weights (seed 0) to {path}: no network here, and timing does not depend on weights")
    started = time.perf_counter()
    import logging

    class _Indented(logging.Handler):  # the exporter's progress lines, indented under ours
        def emit(self, record: logging.LogRecord) -> None:
            log(f"  {record.getMessage()}")

    export_log, handler = logging.getLogger("vit_explain.export"), _Indented()
    export_log.addHandler(handler)
    export_log.setLevel(logging.INFO)
    try:
        export_model(ModelSpec(name, weights="random", seed=0), path)
    finally:
        export_log.removeHandler(handler)
    log(f"  export took {time.perf_counter() - started:.0f} s")
    return path, True


def code_state() -> str:
    """The commit measured, and which package files differ from it (others may be editing)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "vit_explain").splitlines()]
    return f"{commit}" + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else ", clean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("--methods", default="rollout,grad_rollout")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--pause", type=float, default=PAUSE_S,
        help=f"seconds between two pipelines' calls, so no thread pool still spins (default {PAUSE_S})",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--output", type=Path, default=None, help="results file (default benchmarks/results/results-<date>.md)")
    args = parser.parse_args(argv)

    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    temporary = None
    if args.images.is_dir() and find_images(args.images):
        images = find_images(args.images)
        image_note = f"{len(images)} images from {args.images}"
    else:
        temporary = tempfile.TemporaryDirectory(prefix="vit-explain-bench-")
        images = synthetic_photos(Path(temporary.name))
        image_note = f"{args.images} not found: {len(images)} synthetic 640x480 JPEG photos"
    log(image_note)

    onnx_path, exported = ensure_model(args.model, args.models_dir)
    code = code_state()
    info_before = machine_info()
    started = time.perf_counter()
    try:
        rows = run_benchmark(
            args.model, onnx_path, images, batch_sizes=batch_sizes, threads=args.threads,
            repeats=args.repeats, methods=methods, device=args.device, warmup=args.warmup, pause_s=args.pause, log=log,
        )
    finally:
        if temporary is not None:
            temporary.cleanup()
    elapsed = time.perf_counter() - started
    info = machine_info()
    table = format_table(rows)

    lines = [
        f"# vit-explain benchmark: {args.model}, {args.device}, {args.threads} threads",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `python {shlex.join(['benchmarks/run.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- model: {onnx_path.name}, weights random (seed 0){' (exported for this run)' if exported else ''}: "
        "no network here; latency and memory do not depend on weight values",
        f"- code: {code}",
        f"- images: {image_note}; batches cycle through them",
        f"- CPU: {info['cpu']}, {info['cores']} cores; threads: {args.threads} "
        "(torch.set_num_threads, onnxruntime intra_op_num_threads, OMP/BLAS env vars)",
        f"- versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}, "
        f"onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, Pillow {info['PIL']}",
        f"- platform: {info['platform']}",
        f"- pause between two pipelines' calls: {args.pause:g} s (thread pools still spinning after a call "
        "would slow the next process's)",
        f"- load average before / after: {info_before.get('load average', '?')} / {info.get('load average', '?')} "
        "(other processes on the machine inflate latencies; the pipelines run interleaved so they share it)",
        f"- benchmark wall time: {elapsed:.0f} s",
        "",
        table,
    ]
    text = "\n".join(lines)
    print(text)
    output = args.output or ROOT / "benchmarks" / "results" / f"results-{dt.date.today().isoformat()}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
