"""Time ``vit-explain explain DIR`` as a command, folder in and files out, beside the same job
written with PyTorch, and write ``benchmarks/results/command-<date>.md``.

    python benchmarks/command.py --model deit_tiny_patch16_224 --count 32 --size 640x480 --threads 2 --repeats 3

``run.py`` times the engine from image files to masks. A user runs the command: start Python,
load the model, find the photos, decode them, explain, paint an overlay at each photo's size and
write it with the raw mask. Both sides here do all of that, each in a fresh process per run (so
start-up and model loading count, as they do for the user), on the same photos and thread count:

``reference``
    what a PyTorch user would write: timm's model and eval transform, :class:`TorchReference`
    (hooks, ``backward`` for gradient rollout, the ``N x N`` rollout) in batches of ``--batch-size``,
    then for each photo ``np.save`` of the mask and the overlay PNG, painted by the same
    :func:`vit_explain.outputs.overlay` call as the command (so painting costs the same on both
    sides; the reference stretches the mask over the whole photo, as the original tool did);
``command``
    ``vit-explain explain DIR --model FILE --format png --format npy --batch-size N --threads T -q``.

Runs alternate (reference, command, reference, ...) so that other load on the machine falls on
both alike; the table gives the median and the fastest of ``--repeats`` runs. The model is the
random-weight export ``run.py`` makes (``models/<name>_random0.onnx``; weights do not change timing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli_photos import make_photos  # noqa: E402
from benchmarks.harness import machine_info  # noqa: E402
from benchmarks.run import code_state, ensure_model  # noqa: E402
from vit_explain.methods import DEFAULT_DISCARD_RATIO, DEFAULT_HEAD_FUSION  # noqa: E402

#: The reference job, run as ``python -c`` in a fresh process: argv = model, method, photos dir,
#: output dir, batch size, threads, discard ratio, head fusion.
REFERENCE_JOB = r"""
import sys
from pathlib import Path
import numpy as np, timm, torch
from PIL import Image
from vit_explain.outputs import overlay
from vit_explain.reference import TorchReference

name, method, photos, out, batch, threads, discard, fusion = sys.argv[1:9]
batch, threads, discard = int(batch), int(threads), float(discard)
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(name, pretrained=False).eval()
for p in model.parameters():
    p.requires_grad_(False)
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
reference = TorchReference(model)
paths = sorted(Path(photos).glob("*.jpg"))
out = Path(out)
out.mkdir(parents=True, exist_ok=True)
for start in range(0, len(paths), batch):
    chunk = paths[start:start + batch]
    images = [Image.open(p).convert("RGB") for p in chunk]
    pixels = torch.stack([transform(image) for image in images])
    categories = None
    if method == "grad_rollout":
        with torch.no_grad():
            categories = model(pixels).argmax(dim=1).tolist()
    masks = reference.masks(pixels, method=method, head_fusion=fusion, discard_ratio=discard,
                            category_index=categories).numpy()
    for path, image, mask in zip(chunk, images, masks):
        np.save(out / f"{path.stem}.npy", mask)
        overlay(image, mask).save(out / f"{path.stem}.png", compress_level=1)
"""


def reference_command(model: str, method: str, photos: Path, out: Path, batch: int, threads: int) -> list[str]:
    fusion = DEFAULT_HEAD_FUSION[method]
    return [sys.executable, "-c", REFERENCE_JOB, model, method, str(photos), str(out), str(batch), str(threads),
            str(DEFAULT_DISCARD_RATIO), str(fusion)]


def vit_explain_command(onnx_path: Path, method: str, photos: Path, out: Path, batch: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "vit_explain.cli", "explain", str(photos), "--model", str(onnx_path), "-o", str(out),
            "--method", method, "--format", "png", "--format", "npy", "--batch-size", str(batch),
            "--threads", str(threads), "--overwrite", "-q"]


def timed(command: list[str], threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--methods", default="rollout,grad_rollout")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEG photos made for the run")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images", help="photos to resize (else noise)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    width, height = (int(v) for v in args.size.lower().split("x"))
    onnx_path, _ = ensure_model(args.model, args.models_dir)
    sources = sorted(p for p in args.images.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}) if args.images.is_dir() else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="vit-explain-command-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        make_photos(photos, args.count, (width, height), sources)
        for method in (m.strip() for m in args.methods.split(",") if m.strip()):
            times: dict[str, list[float]] = {"reference": [], "command": []}
            commands = {
                "reference": reference_command(args.model, method, photos, Path(tmp) / "ref", args.batch_size, args.threads),
                "command": vit_explain_command(onnx_path, method, photos, Path(tmp) / "cli", args.batch_size, args.threads),
            }
            for _ in range(args.repeats):
                for side in ("reference", "command"):
                    times[side].append(timed(commands[side], args.threads))
                    print(f"{method} {side}: {times[side][-1]:.1f} s", file=sys.stderr, flush=True)
            rows.append((method, times))

    info = machine_info()
    lines = [
        f"# vit-explain benchmark: `vit-explain explain DIR` as a command, {args.model}, {args.threads} threads",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `python {shlex.join(['benchmarks/command.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- code: {code_state()}",
        f"- photos: {args.count} JPEG photos of {width}x{height} made from {len(sources) or 'no'} source images; "
        f"batch size {args.batch_size}; outputs: overlay PNG + .npy per photo on both sides",
        f"- CPU: {info['cpu']}, {info['cores']} cores; versions: python {info['python']}, torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, Pillow {info['PIL']}",
        "- each run is a fresh process (start-up and model loading included); runs alternate between the sides",
        "",
        "| method | reference (PyTorch script) | vit-explain explain DIR | speed-up | reference img/s | vit-explain img/s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for method, times in rows:
        ref, cli = statistics.median(times["reference"]), statistics.median(times["command"])
        lines.append(
            f"| {method} | {ref:.1f} s ({min(times['reference']):.1f}) | {cli:.1f} s ({min(times['command']):.1f}) "
            f"| {ref / cli:.2f}x | {args.count / ref:.1f} | {args.count / cli:.1f} |"
        )
    lines += ["", f"Median of {args.repeats} runs (fastest in parentheses), whole process wall time."]
    text = "\n".join(lines) + "\n"
    print(text)
    output = args.output or ROOT / "benchmarks" / "results" / f"command-{dt.date.today().isoformat()}.md"
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
