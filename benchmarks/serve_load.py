"""Load-test ``vit-explain serve`` on loopback and write ``benchmarks/results/serve-<date>.md``.

    python benchmarks/serve_load.py --images ../shared/images --duration 10 --overload 60

In one run, on the same images and model (DeiT-tiny, random weights: timing does not depend on
weights), per method (rollout, grad_rollout):

``offline``
    :meth:`Explainer.explain` called in this process on batches of 8 image files (decode included),
    the figure the server is held to;
``serve``
    the real server (``vit-explain serve``, a fresh process, ``--max-batch 8``), closed-loop clients
    (asyncio + httpx) at concurrency 1, 8, 32 and 128, each sending one-image ``:explain`` requests
    back to back for ``--duration`` seconds: throughput of answered images, p50/p95/p99 latency;
``serve --max-batch 1``
    the same server without batching across requests;
``overload``
    open loop at twice the throughput measured at concurrency 32, for ``--overload`` seconds, with
    the server's default ``--max-queue 64``: every request must be answered (200 or 503), none lost,
    and the server's resident memory is sampled every second (start, largest, end).

The sweep's servers run with ``--max-queue 256`` so that concurrency 128 is admitted and measures
batching, not refusals. Clients share the machine with the server: their CPU time is in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.cli_photos import make_photos  # noqa: E402
from benchmarks.harness import machine_info  # noqa: E402
from benchmarks.run import IMAGE_SUFFIXES, code_state, ensure_model  # noqa: E402

METHODS = {"rollout": {}, "grad_rollout": {"method": "grad_rollout"}}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ServerProcess:
    """``vit-explain serve`` in a fresh process on a free port; stopped with SIGTERM."""

    def __init__(self, model: Path, threads: int, *flags: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "vit_explain.cli", "serve", str(model), "--port", "0", "--threads", str(threads), *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        line = ""
        while "serving" not in line:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"the server did not start (exit {self.process.wait()})")
        self.url = "http://" + re.search(r"http://([\d.]+:\d+)/", line).group(1)
        self.name = model.stem
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the server was not ready within 60 s")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system, every thread)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=120)
        return self.process.returncode


def request_bodies(images: list[Path], settings: dict) -> list[bytes]:
    return [json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(p.read_bytes()).decode()}, **settings}]}).encode()
            for p in images]


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    latencies, statuses = [], {}
    stop_at = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                response = await client.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                elif response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                i += concurrency

        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"ok": len(latencies), "elapsed": elapsed, "statuses": statuses, **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    values = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return dict(zip(("p50", "p95", "p99"), (float(v) for v in values), strict=True))


async def open_loop(server: ServerProcess, url: str, bodies: list[bytes], rate: float, duration: float) -> dict:
    """Requests started at ``rate`` per second whatever the answers; every one awaited."""
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    memory: list[float] = [server.rss_mib()]
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def one(i: int) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
                key = str(response.status_code)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - a lost request is what this counts
                key = f"lost ({type(exc).__name__})"
            outcomes[key] = outcomes.get(key, 0) + 1

        async def sample_memory() -> None:
            while True:
                await asyncio.sleep(1.0)
                memory.append(server.rss_mib())

        sampler = asyncio.create_task(sample_memory())
        tasks, t0, sent = [], time.monotonic(), 0
        while (now := time.monotonic()) < t0 + duration:
            due = int((now - t0) * rate) + 1
            while sent < due:
                tasks.append(asyncio.create_task(one(sent)))
                sent += 1
            await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        drained = time.monotonic() - t0
        sampler.cancel()
    memory.append(server.rss_mib())
    answered = outcomes.get("200", 0) + outcomes.get("503", 0)
    return {"sent": sent, "outcomes": outcomes, "answered": answered, "drained_s": drained, "memory": memory,
            **_percentiles(latencies)}


def offline(model: Path, images: list[Path], method: str, threads: int, duration: float) -> tuple[float, float]:
    """Images per second of ``Explainer.explain`` on batches of 8 files, for ``duration`` seconds,
    and CPU milliseconds per image (every thread of this process)."""
    from vit_explain.runtime import Explainer

    batch = [images[i % len(images)] for i in range(8)]
    with Explainer(model, device="cpu", threads=threads) as explainer:
        explainer.explain(batch, method=method)  # sessions made before timing
        done, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < duration:
            explainer.explain(batch, method=method)
            done += len(batch)
        return done / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency point")
    parser.add_argument("--overload", type=float, default=60.0, help="seconds at twice the sustainable load (0: skip)")
    parser.add_argument("--methods", default="rollout,grad_rollout")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    model, _ = ensure_model(args.model, args.models_dir)
    if args.images.is_dir():
        images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:  # no photos here: 8 random 640x480 JPEGs
        args.images = Path(tempfile.mkdtemp(prefix="serve-load-"))
        images = make_photos(args.images, 8, (640, 480), [])
    if not images:
        raise SystemExit(f"no images in {args.images}")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, overloads = [], []
    for method in args.methods.split(","):
        settings = METHODS[method]
        bodies = request_bodies(images, settings)
        at_32, offline_rates = None, []
        for label, flags in (("serve --max-batch 8", ["--max-batch", "8"]), ("serve --max-batch 1", ["--max-batch", "1"])):
            # the offline figure before each sweep, and once after: this machine's load drifts
            offline_rates.append(offline(model, images, method, args.threads, args.duration))
            log(f"{method}: offline Explainer.explain at batch 8: {offline_rates[-1][0]:.1f} img/s")
            server = ServerProcess(model, args.threads, *flags, "--max-queue", "256")
            url = f"{server.url}/v1/models/{server.name}:explain"
            try:
                for concurrency in (1, 8):  # warm-up: the sessions for one image and for a batch
                    asyncio.run(closed_loop(url, bodies, concurrency, 1.5))
                for concurrency in levels:
                    server_cpu, client_cpu = server.cpu_s(), time.process_time()
                    result = asyncio.run(closed_loop(url, bodies, concurrency, args.duration))
                    result["server_ms"] = 1000 * (server.cpu_s() - server_cpu) / max(1, result["ok"])
                    result["client_ms"] = 1000 * (time.process_time() - client_cpu) / max(1, result["ok"])
                    throughput = result["ok"] / result["elapsed"]
                    log(f"{method} {label} c={concurrency}: {throughput:.1f} img/s, p50 {result['p50']:.0f} ms, "
                        f"p95 {result['p95']:.0f} ms, p99 {result['p99']:.0f} ms, statuses {result['statuses']}")
                    rows.append((method, label, concurrency, throughput, result))
                    if label.endswith("8") and concurrency == 32:
                        at_32 = throughput
            finally:
                server.stop()
        offline_rates.append(offline(model, images, method, args.threads, args.duration))
        log(f"{method}: offline Explainer.explain at batch 8: {offline_rates[-1][0]:.1f} img/s")
        rows.insert(len(rows) - 2 * len(levels), (method, "offline, Explainer.explain batch 8", "-", offline_rates, None))
        if args.overload > 0 and at_32:
            server = ServerProcess(model, args.threads)  # the defaults: --max-batch 8, --max-queue 64
            url = f"{server.url}/v1/models/{server.name}:explain"
            try:
                asyncio.run(closed_loop(url, bodies, 8, 2.0))
                result = asyncio.run(open_loop(server, url, bodies, 2 * at_32, args.overload))
            finally:
                code = server.stop()
            result.update(method=method, rate=2 * at_32, exit_code=code)
            log(f"{method} overload at {2 * at_32:.1f} req/s for {args.overload:.0f} s: {result['outcomes']}, "
                f"answered {result['answered']}/{result['sent']}, RSS {result['memory'][0]:.0f} -> "
                f"max {max(result['memory']):.0f} -> {result['memory'][-1]:.0f} MiB, exit {code}")
            overloads.append(result)
    output = args.output or ROOT / "benchmarks" / "results" / f"serve-{dt.date.today().isoformat()}-cpu.md"
    output.write_text(report(args, model, images, rows, overloads), encoding="utf-8")
    log(f"wrote {output}")
    return 0


def report(args, model: Path, images: list[Path], rows, overloads) -> str:
    info = machine_info()
    lines = [
        f"# vit-explain serve under load, {dt.date.today().isoformat()}",
        "",
        f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`",
        "",
        f"Model `{model.name}`, {len(images)} images from `{args.images}`, one image per request, "
        f"{args.threads} threads, {args.duration:g} s per point; code {code_state()}.",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "| method | how | concurrency | images/s | vs offline | p50 ms | p95 ms | p99 ms | answers "
        "| CPU ms/image: server + client |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --- | --: |",
    ]
    offline_rate = {}
    for method, label, concurrency, rate, result in rows:
        if result is None:  # the offline runs around the sweeps: their mean is the reference
            offline_rate[method] = statistics.mean(r[0] for r in rate)
            runs = " / ".join(f"{r[0]:.1f}" for r in rate)
            cpu = statistics.mean(r[1] for r in rate)
            lines.append(f"| {method} | {label} (runs: {runs}) | - | {offline_rate[method]:.1f} | 1.00 | | | | | {cpu:.1f} |")
            continue
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"].items()))
        lines.append(f"| {method} | {label} | {concurrency} | {rate:.1f} | {rate / offline_rate[method]:.2f} | "
                     f"{result['p50']:.0f} | {result['p95']:.0f} | {result['p99']:.0f} | {statuses} | "
                     f"{result['server_ms']:.1f} + {result['client_ms']:.1f} |")
    if overloads:
        lines += ["", "Overload: open loop at twice the throughput at concurrency 32 (server defaults, --max-queue 64).", "",
                  "| method | rate req/s | seconds | sent | 200 | 503 | lost | p50 / p99 ms of 200s "
                  "| RSS MiB at 0 / 25 / 50 / 75 / 100% | exit |",
                  "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |"]
        for o in overloads:
            lost = o["sent"] - o["answered"]
            memory = o["memory"]
            lines.append(
                f"| {o['method']} | {o['rate']:.1f} | {args.overload:g} | {o['sent']} | {o['outcomes'].get('200', 0)} | "
                f"{o['outcomes'].get('503', 0)} | {lost} | {o['p50']:.0f} / {o['p99']:.0f} | "
                f"{' / '.join(f'{memory[round(q * (len(memory) - 1))]:.0f}' for q in (0, 0.25, 0.5, 0.75, 1))} | {o['exit_code']} |"
            )
            others = {k: v for k, v in o["outcomes"].items() if k not in ("200", "503")}
            if others:
                lines.append(f"\nOther outcomes ({o['method']}): {others}")
        peaks = ", ".join(f"{o['method']} {max(o['memory']):.0f} MiB" for o in overloads)
        lines.append(f"\nLargest RSS sampled during overload: {peaks}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
