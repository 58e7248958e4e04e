"""float16 against float32: images per second from arrays, mask difference and top-1 agreement.

    python benchmarks/precision.py --model deit_tiny_patch16_224 --batch 8 --threads 2 --repeats 5

The float16 file is converted from the random-weights float32 export without export's bound check
(:func:`vit_explain.export.precision.to_float16`; see ``benchmarks/gpu.py``'s ``model_file``), so
the figures show what half precision does to this model whether or not export would accept it.
Calls of the two files are interleaved; the medians are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import model_file  # noqa: E402
from benchmarks.harness import categories_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--methods", default="rollout,grad_rollout")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    args = parser.parse_args(argv)

    from vit_explain.runtime import Explainer

    files = {p: model_file(args.model, args.models_dir, p) for p in ("fp32", "fp16")}
    explainers = {p: Explainer(path, device=args.device, threads=args.threads) for p, path in files.items()}
    meta = explainers["fp32"].metadata
    pixels = np.random.default_rng(0).standard_normal((args.batch, *meta.preprocess.input_size)).astype(np.float32)
    print(f"{args.model}, batch {args.batch}, device {args.device}, threads {args.threads or 'all'}, "
          f"median of {args.repeats} interleaved calls from arrays")
    print("| method | fp32 img/s | fp16 img/s | fp16 / fp32 | masks, largest difference | top-1 equal |")
    print("| --- | --: | --: | --: | --: | --: |")
    for method in args.methods.split(","):
        categories = None if method in ("rollout", "attention") else categories_for(args.batch, meta.num_outputs)
        results = {p: e.explain(pixels, method=method, category_index=categories) for p, e in explainers.items()}
        times: dict[str, list[float]] = {p: [] for p in explainers}
        for repeat in range(args.repeats):
            for p in ("fp32", "fp16") if repeat % 2 == 0 else ("fp16", "fp32"):
                started = time.perf_counter()
                explainers[p].explain(pixels, method=method, category_index=categories)
                times[p].append(time.perf_counter() - started)
        speed = {p: args.batch / float(np.median(t)) for p, t in times.items()}
        diff = float(np.abs(results["fp32"].masks - results["fp16"].masks).max())
        same = int((results["fp32"].logits.argmax(1) == results["fp16"].logits.argmax(1)).sum())
        print(f"| {method} | {speed['fp32']:.1f} | {speed['fp16']:.1f} | {speed['fp16'] / speed['fp32']:.2f}x | "
              f"{diff:.1e} | {same}/{args.batch} |")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for e in explainers.values():
        e.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
