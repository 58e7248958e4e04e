"""Images per second of ``explain --output-format parquet``: the local engine against the Ray engine
with 1 and 2 actors, Ray's start-up cost, and a worked estimate for 1 million and 100 million images.

    python benchmarks/scale.py --count 96 --size 640x480 --shard-size 16 --repeats 2

All three run the same shard plan on the same JPEG photos with the same model (the random-weight
export ``run.py`` makes, ``models/<name>_random0.onnx``), in this process, each writing its shards
into a fresh folder: the local engine on one Explainer with every core (``--threads``), Ray with
one actor of ``--threads`` threads and with two actors of half as many. Model loading is outside
the local figure (the Explainer is opened first), inside the Ray figures (actors open their own):
the steady rate (after the first shard) is given beside the whole run's. Ray is started once
(local, 4 logical CPUs at least: fewer can deadlock Ray Data) and that start is timed on its own.

The estimate scales the measured cost per image: on CPU nodes by cores (the engines run one image
per core at a time, so a node of C cores is taken as C / (cores here) times this machine, an
assumption the table states), on GPU nodes from the README's H200 figures (measured with
``benchmarks/run.py --device cuda``: results-2026-11-26-cuda-deit_*.md). The results go to
``benchmarks/results/scale-<date>-cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli_photos import make_photos  # noqa: E402
from benchmarks.harness import machine_info  # noqa: E402
from benchmarks.run import code_state, ensure_model  # noqa: E402

#: Images per second of ``Explainer.explain`` on one H200 (batch 64, 8 host threads of a 16-core
#: Xeon), from benchmarks/results/results-2026-11-26-cuda-deit_tiny.md and -deit_base.md.
GPU_RATES = {
    ("deit_tiny_patch16_224", "rollout"): 354.1, ("deit_tiny_patch16_224", "grad_rollout"): 267.0,
    ("deit_base_patch16_224", "rollout"): 291.0, ("deit_base_patch16_224", "grad_rollout"): 183.0,
}


def estimate(images: float, rate: float) -> float:
    """Hours for ``images`` at ``rate`` images per second."""
    return images / rate / 3600.0


def machines_for(images: float, rate_per_machine: float, hours: float) -> int:
    """Machines needed to finish ``images`` within ``hours`` (at least one)."""
    return max(1, -(-int(images) // int(rate_per_machine * hours * 3600)))


def _plan(photos, shard_size, settings):
    from vit_explain.datasets.manifest import DatasetItem
    from vit_explain.datasets.shards import plan_shards, run_stamp

    items = [DatasetItem(str(p), str(p), Path(p.name)) for p in sorted(photos)]
    return plan_shards(items, shard_size, run_stamp(settings, overlays=False))


def _timed(run) -> tuple[float, int]:
    """(seconds, images) of one engine run (a generator of shard results)."""
    started = time.perf_counter()
    images = sum(result.done + result.failed for result in run)
    return time.perf_counter() - started, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--method", default="rollout", choices=["rollout", "grad_rollout"])
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--node-cores", type=int, default=32, help="cores of the CPU node in the estimate")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    import ray

    from vit_explain.datasets.local_engine import run_local
    from vit_explain.datasets.ray_engine import run_ray, start_ray
    from vit_explain.pipeline import ExplainSettings
    from vit_explain.runtime import Explainer

    width, height = (int(v) for v in args.size.split("x"))
    model, _ = ensure_model(args.model, ROOT / "models")
    work = Path(tempfile.mkdtemp(prefix="vit-explain-scale-"))
    shared = sorted((ROOT.parent / "shared" / "images").glob("*.png"))
    (work / "photos").mkdir()
    photos = make_photos(work / "photos", args.count, (width, height), shared)
    head_fusion = "max" if args.method == "rollout" else "mean"
    with Explainer(model, threads=args.threads) as explainer:
        settings = ExplainSettings(args.method, head_fusion, 0.9, None, "top1", model_sha256=explainer.metadata.weights_sha256)
        shards = _plan(photos, args.shard_size, settings)
        one = _plan(photos[:1], 1, settings)  # the fixed cost: one image (Ray: actors start, open the model)
        runs: dict[str, list[tuple[float, float]]] = {"local": [], "ray, 1 actor": [], "ray, 2 actors": []}
        started, ray_start = start_ray(None)
        assert started, "Ray was already running in this process"
        half = max(1, args.threads // 2)
        for repeat in range(-1, args.repeats):  # -1: warm-up (sessions created, worker processes up), not kept
            for name in runs:
                times = []
                for label, plan in (("one", one), ("all", shards if repeat >= 0 else shards[:1])):
                    out = work / f"out-{name.replace(' ', '').replace(',', '-')}-{label}-{repeat + 1}"
                    if name == "local":
                        run = run_local(explainer, plan, out, settings, False, args.batch_size)
                    else:
                        actors = 1 if "1 actor" in name else 2
                        run = run_ray(model, plan, out, settings, False, args.batch_size, actors, "cpu",
                                      args.threads if actors == 1 else half)
                    seconds, images = _timed(run)
                    assert images == sum(len(s.items) for s in plan)
                    times.append(seconds)
                if repeat < 0:
                    continue
                runs[name].append(tuple(times))
                print(f"{name}: 1 image in {times[0]:.1f} s, {args.count} in {times[1]:.1f} s", flush=True)
        shard_bytes = sum(p.stat().st_size for p in (work / "out-local-all-1").glob("shard-*.parquet")) / args.count
        ray.shutdown()

    lines = _report(args, argv, model, runs, ray_start, shard_bytes, explainer.metadata)
    text = "\n".join(lines) + "\n"
    print(text)
    output = args.output or ROOT / "benchmarks" / "results" / f"scale-{dt.date.today().isoformat()}-cpu.md"
    output.write_text(text, encoding="utf-8")
    print(f"written to {output}")
    return 0


def _report(args, argv, model, runs, ray_start, shard_bytes, meta) -> list[str]:
    info = machine_info()
    command = "python benchmarks/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# vit-explain benchmark: Parquet shards, local engine and Ray, {args.model} {args.method}, {args.threads} threads",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- code: {code_state()}",
        f"- photos: {args.count} JPEG photos of {args.size}, shards of {args.shard_size}, batch size {args.batch_size};"
        f" model {model.name} (random weights: timing does not depend on them)",
        f"- CPU: {info['cpu']}, {info['cores']} cores; load average at the end: {info.get('load average', '?')}",
        f"- versions: python {info['python']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, Pillow {info['PIL']},"
        f" ray {__import__('ray').__version__}, pyarrow {__import__('pyarrow').__version__}",
        f"- Ray start-up (local, `ray.init`): **{ray_start:.1f} s**, paid once per command",
        "",
        "| engine | 1 image | all images | img/s, whole run | img/s, marginal | runs |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    rates = {}
    for name, values in runs.items():
        one = statistics.median(v[0] for v in values)
        whole = statistics.median(v[1] for v in values)
        rates[name] = statistics.median((args.count - 1) / (v[1] - v[0]) for v in values)
        lines.append(f"| {name} | {one:.1f} s | {whole:.1f} s | {args.count / whole:.1f} | **{rates[name]:.1f}** | {len(values)} |")
    lines += ["", "Medians. *1 image*: the fixed cost of a run (for Ray: starting the actors, each opening the model; Ray"
              " itself was started once, above). *Marginal*: (images - 1) / (all - 1 image), the rate once running. One"
              " untimed warm-up run per engine first."]
    per_core = rates["local"] / args.threads
    node = per_core * args.node_cores
    gpu = GPU_RATES.get((args.model, args.method))
    lines += [
        "",
        f"Parquet output: {shard_bytes / 1024:.2f} KiB per image ({meta.grid_size[0]}x{meta.grid_size[1]} mask,"
        " top-5, settings), so 1 M images make about"
        f" {shard_bytes * 1e6 / 2**30:.1f} GiB and 100 M about {shard_bytes * 1e8 / 2**40:.2f} TiB.",
        "",
        f"Worked estimate from the local engine's marginal rate ({rates['local']:.1f} img/s on {args.threads} cores,"
        f" {per_core:.2f} img/s per core), assuming a {args.node_cores}-core node runs {args.node_cores // args.threads}"
        f" times this machine's rate (one actor per {args.threads} cores; decoding and the graph scale with cores, the"
        f" driver only writes {shard_bytes / 1024:.1f} KiB per image):",
        "",
        "| images | CPU: 1 node | CPU: nodes for 24 h | CPU node-hours | GPU: 1 H200 | GPU: H200s for 24 h | GPU-hours |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for images in (1e6, 1e8):
        cpu = estimate(images, node)
        gpu_cells = (f"{estimate(images, gpu):.1f} h", str(machines_for(images, gpu, 24)), f"{estimate(images, gpu):.0f}") if gpu \
            else ("-", "-", "-")
        lines.append(f"| {images:.0e} | {cpu:.1f} h | {machines_for(images, node, 24)} | {cpu:.0f} | " + " | ".join(gpu_cells) + " |")
    if gpu:
        lines += ["", f"GPU rate: {gpu} img/s for {args.model} {args.method} on one H200 at batch 64 with 8 host threads"
                  " (README, benchmarks/results/results-2026-11-26-cuda-*.md; measured with the code of commit 7652192,"
                  " Explainer from image files to masks, no Parquet writing)."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
