"""Start the real ``vit-explain serve`` (uvicorn, a fresh process) on a free loopback port.

No mocks: the command runs as a user runs it (``--port 0``: the port it prints), and every test
talks HTTP to it. Bounded: the server has ``STARTUP_S`` to get ready, each request a timeout.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from tests.helpers.paths import REPO_ROOT

STARTUP_S = 60
STOP_S = 60


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    stderr_head: str

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig`` and wait: (exit code, the rest of stderr)."""
        self.process.send_signal(sig)
        try:
            _, stderr = self.process.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server did not stop within {STOP_S} s of signal {sig}") from None
        return self.process.returncode, stderr


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vit_explain.cli", "serve", *args]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


@contextmanager
def running_server(*args: str) -> Iterator[Server]:
    """``vit-explain serve ARGS --port 0``, ready; SIGTERMed (if still running) on leaving."""
    process = subprocess.Popen(serve_command(*args, "--port", "0", "--threads", "2"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO_ROOT)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")):  # "serving NAME (PATH) at http://127.0.0.1:PORT/..."
            line = process.stderr.readline()
            assert line, f"the server ended before serving: {''.join(lines)!r} (exit {process.wait(STOP_S)})"
            lines.append(line)
        line = lines[-1]
        match = re.search(r"http://(127\.0\.0\.1:\d+)/", line)
        assert match, f"no address in the server's line: {line!r}"
        url = f"http://{match.group(1)}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready within {STARTUP_S} s"
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        yield Server(process, url, line)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def png_bytes(seed: int, size: tuple[int, int] = (200, 150)) -> bytes:
    """A random RGB photo of ``size`` (width, height) as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def instance(data: bytes, **settings) -> dict:
    return {"image_bytes": {"b64": base64.b64encode(data).decode("ascii")}, **settings}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        if sample_name == name and ",".join(sorted(sample_labels.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0
