"""Open an exported model in onnxruntime: provider choice, validation, one session per model.

An ``onnxruntime.InferenceSession`` is safe to ``run`` from several threads, so one
:class:`ModelSession` is created per model and shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import DeviceError, ModelFileError
from ..metadata import (
    INPUT_CLASS_WEIGHTS,
    INPUT_COMPUTE_GRADIENTS,
    INPUT_PIXELS,
    METADATA_KEY,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
    MetadataError,
    ModelMetadata,
)

__all__ = ["DEVICES", "GraphOutputs", "ModelSession", "resolve_providers"]

DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def resolve_providers(device: str) -> list[str]:
    """onnxruntime providers for ``device``: CUDA when asked for (or on ``auto`` when present)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [_CPU]
    if device == "cuda":
        if _CUDA not in available:
            raise DeviceError(
                "device 'cuda' asked for, but this onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu as the README says"
            )
        return [_CUDA, _CPU]
    if device == "auto":
        return [_CUDA, _CPU] if _CUDA in available else [_CPU]
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")


@dataclass(frozen=True)
class GraphOutputs:
    logits: np.ndarray  # [B, C]
    attentions: np.ndarray  # [L, B, heads, N, N]
    gradients: np.ndarray | None  # [L, B, heads, N, N], None when not asked for


class ModelSession:
    """A vit-explain model loaded for inference."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a user's terminal is not a log
        if threads:
            options.intra_op_num_threads = threads
        providers = resolve_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types here
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{self.path} is not a readable ONNX model ({reason})") from None
        self.providers = self.session.get_providers()
        self.metadata = self._read_metadata()
        self._check_interface()

    def _read_metadata(self) -> ModelMetadata:
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ModelFileError(
                f"{self.path} is an ONNX model but not a vit-explain export (no '{METADATA_KEY}' metadata); "
                "create one with `vit-explain export MODEL_NAME`"
            )
        try:
            return ModelMetadata.from_json(raw)
        except MetadataError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None

    def _check_interface(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        expected_in = {INPUT_PIXELS, INPUT_CLASS_WEIGHTS, INPUT_COMPUTE_GRADIENTS}
        expected_out = {OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS}
        if not expected_in <= inputs or not expected_out <= outputs:
            raise ModelFileError(f"{self.path}: graph inputs/outputs do not match vit-explain's interface")

    @property
    def uses_cuda(self) -> bool:
        return self.providers[0] == _CUDA

    def run(self, pixel_values: np.ndarray, class_weights: np.ndarray | None = None) -> GraphOutputs:
        """One graph call; the backward half runs only when ``class_weights`` is given."""
        batch = pixel_values.shape[0]
        want_gradients = class_weights is not None
        if class_weights is None:
            class_weights = np.zeros((batch, self.metadata.num_outputs), dtype=np.float32)
        feeds = {
            INPUT_PIXELS: np.ascontiguousarray(pixel_values, dtype=np.float32),
            INPUT_CLASS_WEIGHTS: np.ascontiguousarray(class_weights, dtype=np.float32),
            INPUT_COMPUTE_GRADIENTS: np.array(want_gradients),
        }
        names = [OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS]
        if self.uses_cuda:
            logits, attentions, gradients = self._run_bound(feeds, names)
        else:
            logits, attentions, gradients = self.session.run(names, feeds)
        return GraphOutputs(logits, attentions, gradients if want_gradients else None)

    def _run_bound(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """CUDA: I/O binding, so inputs are copied to the device once and outputs land in host memory
        directly (the rollout maths runs in numpy). A binding per call keeps ``run`` thread-safe."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
