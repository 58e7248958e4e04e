"""A worker process: one pipeline for one case, timed call by call on the driver's command.

Run as ``python -m benchmarks.harness.worker`` by the driver; it reads its configuration and then
commands (``run``, ``stop``) as JSON lines on stdin and answers on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from .results import DISCARD_RATIO, HEAD_FUSION, categories_for


def _batch_paths(images: Sequence[str | os.PathLike], batch: int) -> list[str]:
    """``batch`` paths, cycling through ``images`` when there are fewer."""
    paths = [os.fspath(p) for p in images]
    return [paths[i % len(paths)] for i in range(batch)]


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

        from vit_explain.eager import weights_sha256
        from vit_explain.reference import TorchReference

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


if __name__ == "__main__":
    _worker_main()
