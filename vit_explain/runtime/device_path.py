"""The in-graph path: one call from pixels to logits and masks, bound to preallocated outputs.

Why its own module: the numpy path reads per-layer maps from :class:`.session.ModelSession`
and does the maths on the host; this one runs :func:`vit_explain.graph.method_graph.method_graph`
(model and method in one graph) so that on a GPU only ``[B, C]`` logits and ``[B, grid_h,
grid_w]`` masks cross the bus. Inputs go to the device once (an ``OrtValue`` there on CUDA) and
both outputs are written by onnxruntime straight into host arrays allocated here, so nothing
is copied twice. A binding per call keeps it thread-safe.

The two paths give the same masks (to ~1e-12: the same float64 operations, summed in another
order), tested on the CPU provider in ``tests/device/``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..graph.method_graph import OUTPUT_MASKS, method_inputs
from ..metadata import INPUT_CLASS_WEIGHTS, INPUT_PIXELS, OUTPUT_LOGITS
from ..methods.registry import DEFAULT_HEAD_FUSION, get_method
from ..methods.settings import Settings
from .session import ModelSession

__all__ = ["DevicePath", "method_kind"]


def method_kind(method: str, head_fusion: str | None, top1: bool) -> tuple[str, str, str | None, bool]:
    """The session kind of a method graph: one per (method, head fusion, top-1), the discard ratio
    and start layer being inputs of the graph."""
    record = get_method(method)
    return ("method", method, head_fusion if record.uses_head_fusion else None, bool(top1 and record.class_specific))


class DevicePath:
    """Runs a method's graph on a :class:`ModelSession` (its sessions, threads and provider)."""

    def __init__(self, session: ModelSession) -> None:
        if session.method_graph_declines:
            raise ValueError(f"the method cannot run in this model's graph: {session.method_graph_declines}")
        self.session = session
        self.metadata = session.metadata
        self._device = "cuda" if session.uses_cuda else "cpu"

    def prepare(self, method: str, head_fusion: str | None, single_thread: bool = False, top1: bool = False) -> None:
        """Create now the session :meth:`run` will use (``head_fusion`` None: the method's default)."""
        fusion = head_fusion or DEFAULT_HEAD_FUSION[method]
        self.session._session(method_kind(method, fusion, top1), single_thread)

    def run(
        self,
        pixel_values: np.ndarray,
        settings: Settings,
        class_weights: np.ndarray | None = None,
        single_thread: bool = False,
        top1: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(logits [B, C], masks [B, grid_h, grid_w])`` for one batch, in one graph call.

        ``class_weights`` (or ``top1``: each image's own top-1 output) for the class-specific
        methods, as :meth:`ModelSession.run_fused`."""
        record = settings.record
        top1 = top1 and record.class_specific
        if record.class_specific and not top1 and class_weights is None:
            raise ValueError(f"{settings.method} needs class weights")
        if top1 and class_weights is not None:
            raise ValueError("give class weights or top1, not both")
        meta = self.metadata
        session = self.session._session(method_kind(settings.method, settings.head_fusion, top1), single_thread)
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        batch = pixels.shape[0]
        binding = session.io_binding()
        held = [self._bind_input(binding, INPUT_PIXELS, pixels)]  # alive until the call returns
        if record.class_specific and not top1:
            held.append(self._bind_input(binding, INPUT_CLASS_WEIGHTS, np.ascontiguousarray(class_weights, dtype=np.float32)))
        for name, value in method_inputs(settings.method, settings.discard_ratio, settings.start_layer, meta.num_tokens).items():
            binding.bind_cpu_input(name, value)
        logits = np.empty((batch, meta.num_outputs), dtype=np.float32)
        masks = np.empty((batch, *meta.grid_size), dtype=np.float32)
        for name, array in ((OUTPUT_LOGITS, logits), (OUTPUT_MASKS, masks)):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding)
        del held
        return logits, masks

    def _bind_input(self, binding: ort.IOBinding, name: str, value: np.ndarray) -> np.ndarray | ort.OrtValue:
        """On CUDA an OrtValue on the device (one host-to-device copy, before the call), else the
        host array itself; returned, for the caller to hold until the call is over."""
        if self._device == "cpu":
            binding.bind_cpu_input(name, value)
            return value
        on_device = ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
        binding.bind_ortvalue_input(name, on_device)
        return on_device
