"""What one benchmark case measured, and how results are printed (no timing happens here)."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vit_explain.methods import DEFAULT_DISCARD_RATIO, DEFAULT_HEAD_FUSION

__all__ = [
    "PIPELINES", "PAUSE_S", "HEAD_FUSION", "DISCARD_RATIO", "MIB",
    "PipelineStats", "BenchRow", "categories_for", "format_table", "machine_info",
]

PIPELINES = ("reference", "runtime", "graph")
#: Same settings on both sides: the runtime's defaults (the registry's), for the methods the
#: PyTorch reference also computes.
HEAD_FUSION = {name: DEFAULT_HEAD_FUSION[name] for name in ("rollout", "grad_rollout")}
DISCARD_RATIO = DEFAULT_DISCARD_RATIO
#: Seconds between two pipelines' calls. onnxruntime's intra-op threads keep spinning for about
#: 45 ms after a multi-threaded call returns (2-core AMD EPYC: 42 ms of CPU within 50 ms of the
#: return, 8 ms more over the next 350 ms), PyTorch's OpenMP threads for about 8 ms. With the
#: 20 ms pause used before, the next process shared a core with that spinning: at batch 1 the
#: bare graph call took 33 ms median against 17 ms with a pause of 0.1 s or more, and the
#: reference 120 ms against 77-85 ms.
PAUSE_S = 0.1
MIB = 1024.0 * 1024.0




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
