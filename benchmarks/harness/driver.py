"""The driver: starts one worker process per pipeline and case, and drives them in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .results import HEAD_FUSION, MIB, PAUSE_S, PIPELINES, BenchRow, PipelineStats

__all__ = ["run_benchmark"]

#: The repository root: workers run ``python -m benchmarks.harness.worker`` from it.
ROOT = Path(__file__).resolve().parents[2]


class _WorkerError(RuntimeError):
    pass


class _Worker:
    """One fresh Python process running one pipeline for one case, driven line by line."""

    def __init__(self, config: dict[str, Any], threads: int) -> None:
        self.pipeline = config["pipeline"]
        env = dict(os.environ)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        package_root = str(ROOT)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._stderr_tail = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.harness.worker"],
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
            peak_rss_mib=finals[p]["peak_rss"] / MIB,
            loaded_rss_mib=ready[p]["loaded_rss"] / MIB,
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
