"""Ctrl-C stops ``vit-explain explain`` cleanly, wherever it lands.

A Ctrl-C once ended a ``--report`` run with ``terminate called without an active exception``
(exit 134): the process exited while a worker thread was still inside onnxruntime. Now the first
Ctrl-C stops the work (queued work cancelled, running work waited for, later Ctrl-Cs ignored
until then), prints one ``interrupted`` line and exits with 130. Each phase is hit in turn: just
before the work, early and late in the batches, and in the report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vit_explain
from vit_explain.runtime import Explainer

PACKAGE_ROOT = Path(vit_explain.__file__).resolve().parents[1]
IMAGES = 20
#: Send SIGINT once this many images are complete (None: once the output folder exists, i.e. the
#: model is open and the work about to start; IMAGES: during the report).
TRIGGERS = (None, 2, 5, 9, 14, IMAGES)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.jpg")
    return folder


def _complete(out: Path) -> int:
    return sum(1 for _ in out.rglob("*.json")) if out.is_dir() else 0


def _interrupt(args: list[str], out: Path, trigger: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "vit_explain.cli", "explain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (trigger is None and out.is_dir()) or (trigger is not None and _complete(out) >= trigger):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the interrupted run did not stop within 60 s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_in_every_phase(tmp_path, photos, export_family):
    model = export_family("deit-seed1").path
    interrupted = 0
    for repetition, trigger in enumerate(TRIGGERS):
        out = tmp_path / f"out{repetition}"
        args = [str(photos), "--model", str(model), "-o", str(out), "--report", "--batch-size", "4", "--threads", "2"]
        run = _interrupt(args, out, trigger)
        assert "Traceback" not in run.stderr and "terminate called" not in run.stderr, run.stderr
        if run.returncode == 0:  # it finished before the signal came (possible only at the very end)
            assert trigger == IMAGES, run.stderr
            continue
        interrupted += 1
        assert run.returncode == 130, (trigger, run.returncode, run.stderr)
        assert run.stderr.splitlines()[-1].startswith("interrupted"), run.stderr
        assert not [line for line in run.stderr.splitlines() if line.startswith(("Error", "Aborted"))], run.stderr
    assert interrupted >= len(TRIGGERS) - 1


def test_close_stops_the_worker_threads(export_family):
    path = export_family("deit-seed1").path
    before = {t for t in threading.enumerate() if t.name.startswith("vit-explain")}
    with Explainer(path, threads=2) as explainer:
        pixels = np.zeros((4, *explainer.metadata.preprocess.input_size), dtype=np.float32)
        assert explainer.explain(pixels).masks.shape[0] == 4
    assert {t for t in threading.enumerate() if t.name.startswith("vit-explain")} <= before
    with pytest.raises(RuntimeError, match="closed"):
        explainer.explain(pixels)
    explainer.close()  # idempotent
