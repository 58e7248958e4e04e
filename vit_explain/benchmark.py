"""Side-by-side benchmark: the PyTorch reference pipeline vs this runtime vs the bare ONNX graph.

Three pipelines, timed end to end on the same image files, batch sizes and thread count:

``reference``
    what a user would write with PyTorch: Pillow load + timm's eval transform
    (``create_transform(**resolve_model_data_config(model))``) + :class:`~vit_explain.reference.
    TorchReference` ``.masks`` (hooks, ``backward``, full ``N x N`` rollout in float64);
``runtime``
    ``Explainer(onnx_path, threads=threads).explain(paths, method=..., category_index=...)``;
``graph``
    ``explainer.graph_calls(pixels, ...)``: the very onnxruntime calls ``explain`` makes (same
    parts of the batch, threads and sessions) and nothing else, on pixels preprocessed
    beforehand, so ``1 - graph / runtime`` is the share of the runtime's latency spent outside
    onnxruntime.

Fairness
    Every (pipeline, method, batch size) runs in its own fresh Python subprocess
    (``python -m vit_explain.benchmark --worker``), so each one's peak RSS is its own and the
    runtime processes never import torch. All workers load up front (in parallel); then the
    three of one case are driven in lockstep, round robin (one call each, rotating the order,
    with a pause between calls, :data:`PAUSE_S`, so no thread pool is still spinning when the
    next process starts), so that load from anything else on the machine drifts over all three
    alike. Thread counts are pinned in each worker (``torch.set_num_threads``, onnxruntime
    ``intra_op_num_threads``, and the OpenMP/BLAS environment variables, which also bound
    numpy's matmul threads). Each call's
    process CPU time is recorded beside its latency: on a busy machine it is the steadier
    number (PyTorch's OpenMP pool suffers far more from oversubscription than onnxruntime's).

Memory is reported twice per pipeline: the total peak RSS of the process (``VmHWM``; see
:func:`_peak_rss_bytes` for why not ``ru_maxrss``), and the increment over the RSS measured
after imports and model/session load (the "working" memory of the work itself). On CUDA the
numbers are host RSS only.

Gradient rollout explains a different class per image (:func:`categories_for`).

Nothing here imports torch at module level; the reference worker imports it when it starts.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PIPELINES", "PAUSE_S", "BenchRow", "PipelineStats", "categories_for", "run_benchmark", "format_table"]

PIPELINES = ("reference", "runtime", "graph")
#: Same settings on both sides: the runtime's defaults (max fusion for rollout, mean for gradients).
HEAD_FUSION = {"rollout": "max", "grad_rollout": "mean"}
DISCARD_RATIO = 0.9
#: Seconds between two pipelines' calls. onnxruntime's intra-op threads keep spinning for about
#: 45 ms after a multi-threaded call returns (2-core AMD EPYC: 42 ms of CPU within 50 ms of the
#: return, 8 ms more over the next 350 ms), PyTorch's OpenMP threads for about 8 ms. With the
#: 20 ms pause used before, the next process shared a core with that spinning: at batch 1 the
#: bare graph call took 33 ms median against 17 ms with a pause of 0.1 s or more, and the
#: reference 120 ms against 77-85 ms.
PAUSE_S = 0.1
_MIB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PipelineStats:
    """One pipeline's timings (seconds per batch) and memory (MiB) for one case."""

    times_s: tuple[float, ...]
    cpu_times_s: tuple[float, ...]  # process CPU time (all threads) of the same calls
    peak_rss_mib: float  # whole-process peak RSS
    loaded_rss_mib: float  # RSS after imports + model/session load, before any work
    setup_s: float  # imports + model/session load, for information

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_times_s)

    @property
    def working_mib(self) -> float:
        """Peak RSS increment over the loaded process: what the work itself needed."""
        return max(0.0, self.peak_rss_mib - self.loaded_rss_mib)


@dataclass(frozen=True)
class BenchRow:
    """One (method, batch size) case: the three pipelines side by side."""

    model: str
    method: str
    batch_size: int
    threads: int
    device: str
    repeats: int
    reference: PipelineStats
    runtime: PipelineStats
    graph: PipelineStats
    mask_max_abs_diff: float | None = None  # runtime vs reference masks; None when weights differ
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reference_images_per_s(self) -> float:
        return self.batch_size / self.reference.median_s

    @property
    def runtime_images_per_s(self) -> float:
        return self.batch_size / self.runtime.median_s

    @property
    def graph_images_per_s(self) -> float:
        return self.batch_size / self.graph.median_s

    @property
    def speedup(self) -> float:
        """Runtime throughput / reference throughput (> 1: the runtime is faster)."""
        return self.reference.median_s / self.runtime.median_s

    @property
    def outside_graph_share(self) -> float:
        """``1 - graph / runtime`` on medians: loading, preprocessing, rollout maths, copies."""
        return 1.0 - self.graph.median_s / self.runtime.median_s

    @property
    def speedup_fastest(self) -> float:
        """:attr:`speedup` on each pipeline's fastest call: steadier when the machine is busy."""
        return self.reference.min_s / self.runtime.min_s

    @property
    def outside_graph_share_fastest(self) -> float:
        """:attr:`outside_graph_share` on the fastest calls."""
        return 1.0 - self.graph.min_s / self.runtime.min_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            reference_images_per_s=self.reference_images_per_s,
            runtime_images_per_s=self.runtime_images_per_s,
            speedup=self.speedup,
            outside_graph_share=self.outside_graph_share,
            speedup_fastest=self.speedup_fastest,
            outside_graph_share_fastest=self.outside_graph_share_fastest,
        )
        return data


def categories_for(batch: int, num_outputs: int) -> list[int]:
    """A different, deterministic class per image (spread over the whole output range)."""
    return [(17 + 389 * i) % num_outputs for i in range(batch)]


# --------------------------------------------------------------------------- #
# Driver (parent process)
# --------------------------------------------------------------------------- #


class _WorkerError(RuntimeError):
    pass


class _Worker:
    """One fresh Python process running one pipeline for one case, driven line by line."""

    def __init__(self, config: dict[str, Any], threads: int) -> None:
        self.pipeline = config["pipeline"]
        env = dict(os.environ)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._stderr_tail = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vit_explain.benchmark", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
            bufsize=1,
        )
        self._send(config)

    def _send(self, message: Any) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail("exited early")

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self._fail("exited without answering")
        reply = json.loads(line)
        if "error" in reply:
            self._fail(reply["error"])
        return reply

    def call(self, command: str) -> dict[str, Any]:
        self._send({"command": command})
        return self.receive()

    def _fail(self, reason: str) -> None:
        self.close(kill=True)
        raise _WorkerError(f"{self.pipeline} worker failed: {reason}\n--- worker stderr (tail) ---\n{self._stderr_tail}")

    def close(self, kill: bool = False) -> None:
        """End the process (closing its stdin ends a healthy worker) and keep its stderr's tail."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._stderr_tail = self._stderr.read().decode("utf-8", "replace")[-3000:]
            self._stderr.close()


def _batch_paths(images: Sequence[str | os.PathLike], batch: int) -> list[str]:
    """``batch`` paths, cycling through ``images`` when there are fewer."""
    paths = [os.fspath(p) for p in images]
    return [paths[i % len(paths)] for i in range(batch)]


def _start_case(base: dict[str, Any], method: str, batch: int, threads: int) -> list[_Worker]:
    config = dict(base, method=method, batch=batch)
    workers: list[_Worker] = []
    try:
        for pipeline in PIPELINES:
            workers.append(_Worker(dict(config, pipeline=pipeline), threads))
    except BaseException:
        for worker in workers:
            worker.close(kill=True)
        raise
    return workers


def _run_case(
    workers: list[_Worker],
    ready: dict[str, dict[str, Any]],
    method: str,
    batch: int,
    warmup: int,
    repeats: int,
    min_repeats: int,
    case_budget_s: float | None,
    pause_s: float,
    log: Callable[[str], None],
) -> tuple[dict[str, PipelineStats], int, float | None, list[str]]:
    try:
        times: dict[str, list[float]] = {p: [] for p in PIPELINES}
        cpu_times: dict[str, list[float]] = {p: [] for p in PIPELINES}

        def one_round(order: Sequence[_Worker], record: bool) -> float:
            started = time.perf_counter()
            for worker in order:
                answer = worker.call("run")
                if record:
                    times[worker.pipeline].append(answer["seconds"])
                    cpu_times[worker.pipeline].append(answer["cpu_seconds"])
                if pause_s:
                    time.sleep(pause_s)  # let thread pools stop spinning before the next process runs
            return time.perf_counter() - started

        round_s = 0.0
        for _ in range(max(0, warmup)):
            round_s = one_round(workers, record=False)
        planned = repeats
        for index in range(repeats):
            order = workers[index % 3:] + workers[:index % 3]  # rotate who goes first
            round_s = one_round(order, record=True)
            if case_budget_s is not None and index == 0 and index + 1 < repeats:
                affordable = int(case_budget_s // max(round_s, 1e-9))
                planned = max(min(repeats, min_repeats), min(repeats, affordable))
                if planned < repeats:
                    log(f"  {method} batch {batch}: {round_s:.1f} s per round, {planned} repeats instead of {repeats}")
            if index + 1 >= planned:
                break
        finals = {w.pipeline: w.call("stop") for w in workers}
    finally:
        for worker in workers:
            worker.close()

    stats = {
        p: PipelineStats(
            times_s=tuple(times[p]),
            cpu_times_s=tuple(cpu_times[p]),
            peak_rss_mib=finals[p]["peak_rss"] / _MIB,
            loaded_rss_mib=ready[p]["loaded_rss"] / _MIB,
            setup_s=ready[p]["setup_s"],
        )
        for p in PIPELINES
    }
    notes = [n for p in PIPELINES for n in ready[p].get("notes", [])]
    same_weights = ready["reference"].get("weights_sha256") == ready["runtime"].get("weights_sha256")
    diff = None
    if same_weights and finals["reference"].get("masks") is not None and finals["runtime"].get("masks") is not None:
        import numpy as np

        diff = float(np.abs(np.asarray(finals["reference"]["masks"]) - np.asarray(finals["runtime"]["masks"])).max())
    elif not same_weights:
        notes.append("reference weights differ from the exported ones: masks not compared (timing is unaffected)")
    if finals["runtime"].get("torch_loaded") or finals["graph"].get("torch_loaded"):
        notes.append("WARNING: torch was imported by a runtime worker")
    return stats, len(times["runtime"]), diff, notes


def run_benchmark(
    model_name: str,
    onnx_path: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    batch_sizes: Sequence[int] = (1, 8, 32),
    threads: int = 2,
    repeats: int = 5,
    methods: Sequence[str] = ("rollout", "grad_rollout"),
    device: str = "cpu",
    *,
    warmup: int = 2,
    min_repeats: int = 3,
    case_budget_s: float | None = 240.0,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    pause_s: float = PAUSE_S,
    prestart: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> list[BenchRow]:
    """Time the three pipelines for every (method, batch size); one :class:`BenchRow` each.

    ``model_kwargs`` go to ``timm.create_model`` for the reference (``torch.manual_seed(seed)``
    first, as ``export --weights random --seed`` does, so a random export and the reference hold
    the same weights and their masks are compared). ``repeats`` timed rounds follow ``warmup``
    untimed ones; a case whose first round shows it would exceed ``case_budget_s`` runs fewer
    (never fewer than ``min_repeats``).

    ``prestart`` starts every case's workers at once, so their imports and model loads overlap
    (all of them finish before the first timed call; idle workers only wait on a pipe). Set it
    to ``False`` to hold one case's processes at a time when memory is short.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    if not images:
        raise ValueError("no images to benchmark")
    unknown = set(methods) - set(HEAD_FUSION)
    if unknown:
        raise ValueError(f"unknown methods: {sorted(unknown)}")
    if repeats < 1 or threads < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError("repeats, threads and batch sizes must be >= 1")
    onnx_path = Path(onnx_path).resolve()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"model file not found: {onnx_path}")
    base = dict(
        model_name=model_name,
        onnx_path=str(onnx_path),
        images=[str(Path(p).resolve()) for p in images],
        threads=threads,
        device=device,
        model_kwargs=dict(model_kwargs or {}),
        seed=seed,
    )
    cases = [(method, batch) for method in methods for batch in batch_sizes]
    started: dict[tuple[str, int], list[_Worker]] = {}
    ready: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}

    def start(case: tuple[str, int]) -> None:
        started[case] = _start_case(base, case[0], case[1], threads)

    def wait_ready(case: tuple[str, int]) -> None:
        ready[case] = {w.pipeline: w.receive() for w in started[case]}

    rows = []
    try:
        if prestart:  # every worker loads in parallel up front; idle workers block on stdin (no CPU)
            log(f"starting {3 * len(cases)} worker processes")
            for case in cases:
                start(case)
            for case in cases:
                wait_ready(case)
        for case in cases:
            method, batch = case
            if case not in started:
                start(case)
            if case not in ready:
                wait_ready(case)
            log(f"{model_name}: {method}, batch {batch}")
            stats, done, diff, notes = _run_case(
                started.pop(case), ready[case], method, batch, warmup, repeats, min_repeats, case_budget_s, pause_s, log
            )
            rows.append(
                BenchRow(
                    model=model_name, method=method, batch_size=batch, threads=threads, device=device,
                    repeats=done, reference=stats["reference"], runtime=stats["runtime"], graph=stats["graph"],
                    mask_max_abs_diff=diff, notes=tuple(dict.fromkeys(notes)),
                )
            )
    finally:
        for workers in started.values():
            for worker in workers:
                worker.close(kill=True)
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """Markdown: latency, CPU time and memory tables, one line per (method, batch size)."""
    timing = [
        "| method | batch | reference ms | runtime ms | graph ms | reference img/s | runtime img/s "
        "| runtime / reference | outside graph | repeats | mask max diff |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    memory = [
        "| method | batch | reference peak RSS | runtime peak RSS | graph peak RSS "
        "| reference working | runtime working | graph working | runtime / reference working |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    cpu = [
        "| method | batch | reference CPU ms | runtime CPU ms | graph CPU ms | reference / runtime CPU |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cpu.append(
            f"| {r.method} | {r.batch_size} | {r.reference.median_cpu_s * 1e3:.1f} | {r.runtime.median_cpu_s * 1e3:.1f} "
            f"| {r.graph.median_cpu_s * 1e3:.1f} | {r.reference.median_cpu_s / max(r.runtime.median_cpu_s, 1e-9):.2f}x |"
        )
        diff = "n/a" if r.mask_max_abs_diff is None else f"{r.mask_max_abs_diff:.1e}"
        timing.append(
            f"| {r.method} | {r.batch_size} | {_ms(r.reference)} | {_ms(r.runtime)} | {_ms(r.graph)} "
            f"| {r.reference_images_per_s:.1f} | {r.runtime_images_per_s:.1f} "
            f"| {r.speedup:.2f}x ({r.speedup_fastest:.2f}x) "
            f"| {r.outside_graph_share:.1%} ({r.outside_graph_share_fastest:.1%}) | {r.repeats} | {diff} |"
        )
        ratio = r.runtime.working_mib / r.reference.working_mib if r.reference.working_mib > 0 else float("nan")
        memory.append(
            f"| {r.method} | {r.batch_size} | {r.reference.peak_rss_mib:.0f} MiB | {r.runtime.peak_rss_mib:.0f} MiB "
            f"| {r.graph.peak_rss_mib:.0f} MiB | +{r.reference.working_mib:.0f} MiB | +{r.runtime.working_mib:.0f} MiB "
            f"| +{r.graph.working_mib:.0f} MiB | {ratio:.2f} |"
        )
    notes = sorted({n for r in rows for n in r.notes})
    legend = [
        "",
        "ms: median latency per batch (fastest call in parentheses); img/s from the median; "
        "runtime / reference: throughput ratio; outside graph: 1 - graph / runtime. Both on medians, "
        "and in parentheses on the fastest calls (steadier when other processes load the machine).",
        "CPU ms: median process CPU time (all threads) per batch; it is less sensitive than latency to other "
        "load on the machine, but counts thread pools spinning while they wait.",
        "Peak RSS: whole process (VmHWM), one fresh process per pipeline and case; "
        "working: peak RSS minus the RSS after imports and model load.",
    ]
    parts = ["\n".join(timing), "", "\n".join(cpu), "", "\n".join(memory), *legend]
    if notes:
        parts += ["", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"


def _ms(stats: PipelineStats) -> str:
    return f"{stats.median_s * 1e3:.1f} ({stats.min_s * 1e3:.1f})"


def machine_info() -> dict[str, str]:
    """CPU model, core count and library versions (for the results file)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "timm", "onnxruntime", "numpy", "PIL"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            info[module] = "not installed"
    try:
        info["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- #
# Worker (child process)
# --------------------------------------------------------------------------- #


def _peak_rss_bytes() -> int:
    """This process image's peak RSS.

    On Linux ``VmHWM`` from ``/proc/self/status``, not ``getrusage(RUSAGE_SELF).ru_maxrss``: the
    kernel carries the pre-``exec`` high-water mark into ``ru_maxrss``, and ``subprocess`` forks
    (vfork) the driver, so a worker started from a 900 MiB process (a pytest session that
    imported torch) would report at least 900 MiB whatever it did. ``VmHWM`` belongs to the new
    address space only. Elsewhere, ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


class _ReferencePipeline:
    """PIL + timm transform + TorchReference.masks, as a PyTorch user would write it."""

    def __init__(self, config: dict[str, Any]) -> None:
        import timm
        import torch
        from PIL import Image

        from vit_explain.reference import TorchReference, weights_sha256

        self.torch, self.Image = torch, Image
        torch.set_num_threads(config["threads"])
        self.device = torch.device(config["device"])
        # Full float32 like the runtime: PyTorch runs cuDNN convolutions in TF32 by default.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(config["seed"])
        model = timm.create_model(config["model_name"], pretrained=False, **config["model_kwargs"]).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.weights_sha256 = weights_sha256(model)
        self.transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        self.reference = TorchReference(model.to(self.device))
        self.paths = _batch_paths(config["images"], config["batch"])
        self.method = config["method"]
        num_outputs = int(getattr(model, "num_classes", 0) or model.num_features)
        self.categories = categories_for(config["batch"], num_outputs) if self.method == "grad_rollout" else None
        self.notes: list[str] = []

    def __call__(self):
        torch = self.torch
        pixels = torch.stack([self.transform(self.Image.open(p).convert("RGB")) for p in self.paths])
        pixels = pixels.to(self.device)
        masks = self.reference.masks(
            pixels, method=self.method, category_index=self.categories,
            head_fusion=HEAD_FUSION[self.method], discard_ratio=DISCARD_RATIO,
        )
        return masks.cpu().numpy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


class _RuntimePipeline:
    """``Explainer.explain`` on image files (``graph=False``) or ``session.run`` on ready pixels."""

    def __init__(self, config: dict[str, Any], graph_only: bool) -> None:
        import numpy as np

        from vit_explain.runtime import Explainer

        self.explainer = Explainer(config["onnx_path"], device=config["device"], threads=config["threads"])
        meta = self.explainer.metadata
        self.weights_sha256 = meta.weights_sha256
        self.notes: list[str] = []
        self.paths = _batch_paths(config["images"], config["batch"])
        self.method = config["method"]
        self.graph_only = graph_only
        # Session creation is model loading (as the reference's model is built before "loaded"):
        # make the sessions this batch will use now, not inside the first timed or measured call.
        self.explainer.prepare(self.method, HEAD_FUSION[self.method], len(self.paths))
        self.notes.append(f"batch {len(self.paths)}: {self.explainer.describe_calls(len(self.paths))}")
        self.categories = categories_for(config["batch"], meta.num_outputs) if self.method == "grad_rollout" else None
        self.pixels = self.weights = None
        if graph_only:
            self.pixels = self.explainer.preprocess(self.paths)
            if self.categories is not None:
                self.weights = np.zeros((len(self.paths), meta.num_outputs), dtype=np.float32)
                self.weights[np.arange(len(self.paths)), self.categories] = 1.0

    def __call__(self):
        if self.graph_only:  # the very graph calls ``explain`` makes (same parts, threads, sessions)
            self.explainer.graph_calls(self.pixels, self.method, HEAD_FUSION[self.method], self.weights)
            return None
        result = self.explainer.explain(
            self.paths, method=self.method, head_fusion=HEAD_FUSION[self.method],
            discard_ratio=DISCARD_RATIO, category_index=self.categories,
        )
        return result.masks

    def synchronize(self) -> None:  # onnxruntime returns host arrays: already synchronous
        pass


def _worker_main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        config = json.loads(sys.stdin.readline())
        started = time.perf_counter()
        if config["pipeline"] == "reference":
            pipeline: Any = _ReferencePipeline(config)
        else:
            pipeline = _RuntimePipeline(config, graph_only=config["pipeline"] == "graph")
        reply(
            dict(
                ready=True,
                setup_s=time.perf_counter() - started,
                loaded_rss=_current_rss_bytes(),
                weights_sha256=pipeline.weights_sha256,
                notes=pipeline.notes,
            )
        )
        masks = None
        for line in sys.stdin:
            command = json.loads(line)["command"]
            if command == "run":
                start, start_cpu = time.perf_counter(), time.process_time()
                masks = pipeline()
                pipeline.synchronize()
                reply({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu})
            elif command == "stop":
                reply(
                    dict(
                        peak_rss=_peak_rss_bytes(),
                        masks=None if masks is None else masks.tolist(),
                        torch_loaded="torch" in sys.modules,
                    )
                )
                return
            else:
                raise ValueError(f"unknown command {command!r}")
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which raises
        import traceback

        traceback.print_exc()
        reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
