"""The device path's report (issue 20): per model and method, the numpy path against the method in the graph.

    python benchmarks/gpu.py --device cuda --models deit_tiny_patch16_224,deit_base_patch16_224 --batch-sizes 64,256
    python benchmarks/gpu.py --device cpu --models deit_tiny_patch16_224 --batch-sizes 4,8 --threads 2 --repeats 3

For each model, method and batch, both paths (``Explainer(method_in_graph=False/True)``) are
timed in one process, their calls interleaved so that load from elsewhere falls on both alike:

- **arrays**: ``explain`` on preprocessed ``float32`` pixels (the issue's targets are here);
- **files**: ``explain`` on 224 px JPEG files (decoding included, pipelined on CUDA), with the
  cores it kept busy (process CPU time / wall time);
- **graph alone**: the very onnxruntime calls ``explain`` makes (``Explainer.graph_calls``), on
  pixels preprocessed beforehand; for the in-graph path that call includes the method's maths;
- **outside the graph**: ``1 - graph alone / arrays``;
- **memory**: on CUDA the device's peak memory in use while the case ran (``nvidia-smi``,
  sampled every 20 ms: the whole GPU, other processes included), on a CPU the process's peak RSS.

Models are exported with random weights (``models/<name>_random0[_fp16].onnx``) when absent:
there is no network here, and timing does not depend on weight values. Masks of the two paths
are compared in every case (largest difference printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import categories_for, machine_info  # noqa: E402
from benchmarks.run import code_state, ensure_model, log  # noqa: E402
from vit_explain.methods import DEFAULT_HEAD_FUSION  # noqa: E402

PATHS = ("numpy", "in-graph")


class GpuMemory:
    """Peak device memory in use (MiB) while it runs, sampled with nvidia-smi; None without one."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, check=True, timeout=5).stdout
            return float(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            used = self._used()
            if used is None:
                return
            self.peak = used if self.peak is None else max(self.peak, used)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def model_file(name: str, models_dir: Path, precision: str) -> Path:
    """The random-weights export of ``name`` at ``precision``, exported when absent.

    The float16 file is converted from the float32 one without export's bound check: on random
    weights the attention is nearly uniform, so rollout's discard threshold is sensitive to the
    last bits and export refuses it (DeiT-tiny: masks move by 0.2); timing does not depend on it."""
    full = ensure_model(name, models_dir)[0]
    if precision == "fp32":
        return full
    path = models_dir / f"{name}_random0_fp16.onnx"
    if not path.is_file():
        import onnx

        from vit_explain.export.precision import to_float16

        log(f"converting {full.name} to float16 (unchecked, for timing) as {path.name}")
        onnx.save(to_float16(onnx.load(str(full))), str(path))
    return path


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def jpeg_files(directory: Path, count: int, size: int = 224) -> list[Path]:
    """``count`` distinct photo-like ``size`` px JPEGs (smooth colour fields and noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([128 + 90 * np.sin(x / (20 + i % 17) + c) * np.cos(y / (25 + i % 13) - c) for c in (0.0, 1.3, 2.6)], -1)
        base += rng.normal(0, 10, base.shape)
        path = directory / f"photo_{i:04d}.jpg"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def timed(call) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_case(explainers, method: str, batch: int, pixels, files, repeats: int) -> dict:
    meta = explainers["numpy"].metadata
    categories = categories_for(batch, meta.num_outputs) if method != "rollout" else None
    weights = None
    if categories is not None:
        weights = np.zeros((batch, meta.num_outputs), np.float32)
        weights[np.arange(batch), categories] = 1.0
    fusion = DEFAULT_HEAD_FUSION[method]
    modes = {
        "arrays": lambda e: e.explain(pixels, method=method, category_index=categories),
        "files": lambda e: e.explain(files, method=method, category_index=categories),
        "graph": lambda e: e.graph_calls(pixels, method, fusion, weights),
    }
    times = {(p, m): [] for p in PATHS for m in modes}
    cpu = {p: [] for p in PATHS}
    masks = {p: modes["arrays"](explainers[p]).masks for p in PATHS}  # warm-up, and the masks compared
    for e in explainers.values():
        modes["files"](e)
        modes["graph"](e)
    with GpuMemory() as memory:
        for repeat in range(repeats):
            for mode, call in modes.items():
                for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                    wall, used = timed(lambda: call(explainers[path]))  # noqa: B023
                    times[path, mode].append(wall)
                    if mode == "files":
                        cpu[path].append(used / wall)
    row = {"method": method, "batch": batch, "mask_diff": float(np.abs(masks["numpy"] - masks["in-graph"]).max()),
           "gpu_mib": memory.peak, "rss_mib": peak_rss_mib()}
    for path in PATHS:
        for mode in modes:
            row[path, mode] = batch / float(np.median(times[path, mode]))
        row[path, "outside"] = 1 - row[path, "arrays"] / row[path, "graph"]
        row[path, "cores"] = float(np.median(cpu[path]))
    return row


def table(model: str, rows: list[dict]) -> str:
    lines = [
        "| model | method | batch | path | arrays img/s | files img/s (cores busy) | graph alone img/s | outside the graph | memory |",
        "| --- | --- | --: | --- | --: | --: | --: | --: | --: |",
    ]
    for row in rows:
        memory = f"{row['gpu_mib']:.0f} MiB GPU" if row["gpu_mib"] is not None else f"{row['rss_mib']:.0f} MiB RSS"
        for path in PATHS:
            lines.append(
                f"| {model} | {row['method']} | {row['batch']} | {path} | {row[path, 'arrays']:.1f} | "
                f"{row[path, 'files']:.1f} ({row[path, 'cores']:.1f}) | {row[path, 'graph']:.1f} | "
                f"{100 * row[path, 'outside']:.0f}% | {memory} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="deit_tiny_patch16_224,deit_base_patch16_224")
    parser.add_argument("--methods", default="rollout,grad_rollout")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime and decoding threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)

    from vit_explain.runtime import Explainer

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    sections = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vit-explain-gpu-bench-") as directory:
        files_all = jpeg_files(Path(directory), max(batch_sizes))
        for model in args.models.split(","):
            path = model_file(model, args.models_dir, args.precision)
            explainers = {
                p: Explainer(path, device=args.device, threads=args.threads, graph_batch=max(batch_sizes),
                             method_in_graph=(p == "in-graph"))
                for p in PATHS
            }
            meta = explainers["numpy"].metadata
            rows = []
            for batch in batch_sizes:
                pixels = explainers["numpy"].preprocess(files_all[:batch])
                for method in methods:
                    log(f"{model} {method} batch {batch}")
                    rows.append(run_case(explainers, method, batch, pixels, files_all[:batch], args.repeats))
                    log(f"  masks differ by {rows[-1]['mask_diff']:.1e}")
            device = "cuda" if explainers["numpy"].session.uses_cuda else "cpu"
            for e in explainers.values():
                e.close()
            sections.append((model, meta, device, rows))
    info = machine_info()
    lines = [
        "# vit-explain device path: numpy maths vs the method in the graph",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `python {shlex.join(['benchmarks/gpu.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- code: {code_state()}",
        f"- device: {sections[0][2]}; CPU: {info['cpu']}, {info['cores']} cores; threads: {args.threads or 'all'}",
        f"- versions: python {info['python']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}",
        f"- precision: {args.precision}; weights random (seed 0); {args.repeats} calls per figure (median), interleaved",
        f"- load average at the end: {info.get('load average', '?')}; wall time {time.perf_counter() - started:.0f} s",
        "- masks of the two paths, largest difference per case: "
        + ", ".join(f"{m} {r['method']}/{r['batch']}: {r['mask_diff']:.1e}" for m, _, _, rows in sections for r in rows),
        "",
        "\n\n".join(table(model, rows) for model, _, _, rows in sections),
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
