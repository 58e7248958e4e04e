"""Open an exported model in onnxruntime: provider choice, validation, one session per model.

An ``onnxruntime.InferenceSession`` is safe to ``run`` from several threads, so one
:class:`ModelSession` is created per model and shared.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnxruntime as ort

from ..errors import DeviceError, ModelFileError, first_line
from ..graph import FUSED_OUTPUT, SessionKind, derive, forward_only, fused_kind
from ..graph.method_graph import method_graph, unsupported_layout
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
from ..methods.registry import get_method
from ..methods.windowed import unpack
from ..windowing import layout_of
from .file_checks import check_external_data, check_graph_shapes

__all__ = [
    "DEVICES",
    "GraphOutputs",
    "LayerOutputs",
    "ModelSession",
    "check_external_data",
    "check_graph_shapes",
    "forward_only",
    "resolve_providers",
]

DEVICES = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


#: Full float32 on CUDA: onnxruntime's CUDA provider otherwise lets Ampere and newer GPUs run
#: float32 matrix products and convolutions in TF32 (10-bit mantissa), which moves attentions by
#: ~1e-3 and, through the discard threshold, masks by up to ~0.1.
_CUDA_OPTIONS = {"use_tf32": "0"}


def resolve_providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime providers for ``device``: CUDA when asked for (or on ``auto`` when present)."""
    available = ort.get_available_providers()
    cuda = [(_CUDA, dict(_CUDA_OPTIONS)), _CPU]
    if device == "cpu":
        return [_CPU]
    if device == "cuda":
        if _CUDA not in available:
            raise DeviceError(
                "device 'cuda' asked for, but this onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu as the README says"
            )
        return cuda
    if device == "auto":
        return cuda if _CUDA in available else [_CPU]
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")


@dataclass(frozen=True)
class GraphOutputs:
    logits: np.ndarray  # [B, C]
    attentions: np.ndarray  # [L, B, heads, N, N]
    gradients: np.ndarray | None  # [L, B, heads, N, N], None when not asked for


@dataclass(frozen=True)
class LayerOutputs:
    logits: np.ndarray  # [B, C]
    attentions: list[np.ndarray]  # per layer [B, heads, N, N]
    gradients: list[np.ndarray] | None  # per layer [B, heads, N, N], None when not asked for


class ModelSession:
    """A vit-explain model loaded for inference.

    onnxruntime sessions are made from the one file, each on first use (:mod:`vit_explain.graph`):
    for the class-specific methods the graph with its gradient branch inlined, for the others a
    forward-only graph pruned from it, both returning one output per layer; and, for
    :meth:`run_fused`, one graph per (method, head fusion) that returns head-fused maps instead
    of raw per-head tensors. The pruned graph matters for memory, not only speed: in the file's
    graph the forward values the backward branch reads stay alive until the ``If`` node runs,
    even when it takes the empty branch (about 3x the working memory at batch 32).
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        self.providers = resolve_providers(device)
        self.threads = threads
        # Checked before any session or buffer is sized from the file: the metadata on its own,
        # then against the graph's declared shapes (the external weights are not even read).
        model = self._load_proto(with_external_data=False)
        self.metadata = self._read_metadata(model)
        self._check_interface(model)
        try:
            check_graph_shapes(self.metadata, model)
        except MetadataError as exc:
            raise MetadataError(f"{self.path}: {exc}") from None
        forward_only(model)  # refuses a file whose forward half reads the class weights, now
        #: Why the method cannot run inside the graph for this file (None: it can), see
        #: :func:`vit_explain.graph.method_graph.unsupported_layout`.
        self.method_graph_declines = unsupported_layout(
            self.metadata, next((o for o in model.graph.output if o.name == OUTPUT_ATTENTIONS), None)
        )
        self.window_layout = layout_of(self.metadata)  # a windowed model's (Swin), checked above
        del model
        self._sessions: dict[tuple[SessionKind, bool], ort.InferenceSession] = {}
        #: Per session kind, the output names of each stacked output's layers (None: kept stacked).
        self._layer_names: dict[SessionKind, dict[str, list[str] | None]] = {}
        #: Per session kind, its derived graph, kept only until both its sessions (multi- and
        #: single-threaded) exist: each variant is derived once per model, and no copy of the
        #: weights is held longer than a session may still need it.
        self._derived: dict[SessionKind, bytes] = {}
        self._lock = threading.Lock()

    def _load_proto(self, with_external_data: bool = True) -> onnx.ModelProto:
        """The file's graph; weights stored beside it (external data) are read only when asked
        for, and only from files inside the model's own folder (:func:`check_external_data`)."""
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several unrelated types here
            raise ModelFileError(f"{self.path} is not a readable ONNX model ({first_line(exc)})") from None
        check_external_data(model, self.path)
        if with_external_data:
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(self.path.parent))
            except Exception as exc:  # noqa: BLE001 - a missing, short or unreadable data file
                raise ModelFileError(f"{self.path}: its external data cannot be read ({first_line(exc)})") from None
        return model

    def _read_metadata(self, model: onnx.ModelProto) -> ModelMetadata:
        raw = {prop.key: prop.value for prop in model.metadata_props}.get(METADATA_KEY)
        if raw is None:
            raise ModelFileError(
                f"{self.path} is an ONNX model but not a vit-explain export (no '{METADATA_KEY}' metadata); "
                "create one with `vit-explain export MODEL_NAME`"
            )
        try:
            return ModelMetadata.from_json(raw)
        except MetadataError as exc:
            raise MetadataError(f"{self.path}: {exc}") from None

    def _check_interface(self, model: onnx.ModelProto) -> None:
        inputs = {i.name for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        expected_in = {INPUT_PIXELS, INPUT_CLASS_WEIGHTS, INPUT_COMPUTE_GRADIENTS}
        expected_out = {OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS}
        if not expected_in <= inputs or not expected_out <= outputs:
            raise ModelFileError(f"{self.path}: graph inputs/outputs do not match vit-explain's interface")

    def _options(self, single_thread: bool) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a user's terminal is not a log
        if single_thread:
            options.intra_op_num_threads = 1
        elif self.threads:
            options.intra_op_num_threads = self.threads
        # The memory-pattern planner pre-allocates one block for the largest batch seen; without it
        # the working memory at batch 8 is ~30% (forward) to ~50% (gradients) lower, at equal speed.
        options.enable_mem_pattern = False
        return options

    def _session(self, kind: SessionKind, single_thread: bool = False) -> ort.InferenceSession:
        """The session for ``kind`` (see :data:`SessionKind`), made from the file on first use.

        ``single_thread``: a session that runs each call on the calling thread alone. Several
        such calls at once, each on part of a batch, keep the cores busier than one call that
        splits every operator over them (see :class:`~vit_explain.runtime.explainer.Explainer`).
        It is a second session, with its own copy of the weights, made on first use."""
        key = (kind, bool(single_thread))
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:  # one creation per kind, even when first calls race
            if key not in self._sessions:
                source = str(self.path) if kind == "full" else self._derived_graph(kind)
                try:
                    session = ort.InferenceSession(source, self._options(single_thread), providers=self.providers)
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types here
                    raise ModelFileError(f"{self.path} cannot be loaded by onnxruntime ({first_line(exc)})") from None
                if self.uses_cuda and _CUDA not in session.get_providers():
                    # onnxruntime falls back to the CPU, with only a log line, when the CUDA
                    # provider cannot start (missing cuDNN/cuBLAS, driver mismatch).
                    raise DeviceError(
                        "onnxruntime's CUDA provider is installed but could not start (check the CUDA and "
                        "cuDNN libraries onnxruntime-gpu needs); use device 'cpu' to run on the CPU"
                    )
                self._sessions[key] = session
                if all((kind, threading_) in self._sessions for threading_ in (False, True)):
                    self._derived.pop(kind, None)
            return self._sessions[key]

    def _derived_graph(self, kind: SessionKind) -> bytes:
        """The serialized graph of ``kind`` (:func:`vit_explain.graph.derive`), derived from the
        file on the first session of that kind; its per-layer output names go to
        :attr:`_layer_names`, shared by the single- and multi-threaded sessions. Called under the
        lock."""
        if kind not in self._derived:
            if isinstance(kind, tuple) and kind[0] == "method":  # the method's maths in the graph
                model, layers = method_graph(self._load_proto(), *kind[1:], self.metadata), {}
            else:
                model, layers = derive(self._load_proto(), kind, self.metadata.output_kind, self.metadata.num_layers)
            self._layer_names[kind] = layers
            self._derived[kind] = model.SerializeToString()
        return self._derived[kind]

    @property
    def full_session(self) -> ort.InferenceSession:
        """The whole graph, with the ``compute_gradients`` input."""
        return self._session("full")

    @property
    def forward_session(self) -> ort.InferenceSession:
        """The forward-only graph: ``pixel_values`` in, ``logits`` and ``attentions`` out."""
        return self._session("forward")

    @property
    def uses_cuda(self) -> bool:
        return self.providers[0] != _CPU

    def prepare(
        self,
        method: str | None = None,
        head_fusion: str | None = None,
        fused: bool = False,
        single_thread: bool = False,
        top1: bool = False,
    ) -> None:
        """Create now the session a later call will use (they are otherwise made on first use):
        ``method=None`` the forward-only one, ``rollout``/``attention`` without ``fused`` too,
        ``grad_rollout``/``gae`` without ``fused`` the gradient one, with ``fused`` that method's;
        ``top1``: the one that picks the class to explain itself."""
        if fused:
            self._session(fused_kind(method, head_fusion, top1), single_thread)
        elif method is not None and get_method(method).class_specific:
            self._session("gradients_top1" if top1 else "gradients", single_thread)
        else:
            self._session("forward", single_thread)

    def run_layers(
        self,
        pixel_values: np.ndarray,
        class_weights: np.ndarray | None = None,
        single_thread: bool = False,
        top1: bool = False,
    ) -> LayerOutputs:
        """One graph call: forward only, or forward + attention gradients when ``class_weights``
        is given (or, with ``top1``, for each image's own top-1 class or output direction, see
        :func:`vit_explain.graph.top1_class_weights`); every layer's map as its own array, as the
        graph computed it (no stacking)."""
        feeds = {INPUT_PIXELS: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        kind = "forward"
        if top1:
            if class_weights is not None:
                raise ValueError("give class weights or top1, not both")
            kind = "gradients_top1"
        elif class_weights is not None:
            feeds[INPUT_CLASS_WEIGHTS] = np.ascontiguousarray(class_weights, dtype=np.float32)
            kind = "gradients"
        session = self._session(kind, single_thread)
        layers = self._layer_names[kind]
        with_gradients = kind != "forward"
        groups = [OUTPUT_ATTENTIONS] + ([OUTPUT_GRADIENTS] if with_gradients else [])
        names = [OUTPUT_LOGITS]
        for group in groups:
            names.extend(layers[group] or [group])
        values = iter(self._run(session, feeds, names))
        logits = next(values)
        per_group = [[next(values) for _ in layers[group]] if layers[group] else self._layers_of(next(values)) for group in groups]
        return LayerOutputs(logits, per_group[0], per_group[1] if with_gradients else None)

    def _layers_of(self, stacked: np.ndarray) -> list[np.ndarray]:
        """A stacked output's layers: ``[L, B, ...]`` split on its first axis or, for a windowed
        model, the packed ``[B, values]`` split into its blocks (:func:`~vit_explain.methods.windowed.unpack`)."""
        return list(stacked) if self.window_layout is None else unpack(stacked, self.window_layout)

    def run(
        self, pixel_values: np.ndarray, class_weights: np.ndarray | None = None, single_thread: bool = False
    ) -> GraphOutputs:
        """:meth:`run_layers` with the layers stacked, ``[L, B, heads, N, N]``, as the file's outputs
        (not for a windowed model, whose blocks differ in shape: use :meth:`run_layers`)."""
        if self.metadata.windows is not None:
            raise ValueError("a windowed model's blocks differ in shape and cannot be stacked: use run_layers")
        outputs = self.run_layers(pixel_values, class_weights, single_thread)
        gradients = None if outputs.gradients is None else np.stack(outputs.gradients)
        return GraphOutputs(outputs.logits, np.stack(outputs.attentions), gradients)

    def run_fused(
        self,
        pixel_values: np.ndarray,
        method: str,
        head_fusion: str | None,
        class_weights: np.ndarray | None = None,
        single_thread: bool = False,
        top1: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the per-layer head-fused maps ``[L, B, N, N]`` that ``method`` reads
        (:func:`vit_explain.graph.fused_maps`): ``heads`` times less data out of the graph than
        :meth:`run`. ``class_weights`` (or ``top1``, as in :meth:`run_layers`) for
        ``grad_rollout`` and ``gae``."""
        class_specific = get_method(method).class_specific
        top1 = top1 and class_specific
        if top1 and class_weights is not None:
            raise ValueError("give class weights or top1, not both")
        session = self._session(fused_kind(method, head_fusion, top1), single_thread)
        feeds = {INPUT_PIXELS: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if class_specific and not top1:
            if class_weights is None:
                raise ValueError(f"{method} needs class weights")
            feeds[INPUT_CLASS_WEIGHTS] = np.ascontiguousarray(class_weights, dtype=np.float32)
        logits, fused = self._run(session, feeds, [OUTPUT_LOGITS, FUSED_OUTPUT])
        return logits, fused

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if self.uses_cuda:
            return self._run_bound(session, feeds, names)
        return session.run(names, feeds)

    def _run_bound(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """CUDA: I/O binding, so inputs are copied to the device once and outputs land in host memory
        directly (the rollout maths runs in numpy). A binding per call keeps ``run`` thread-safe."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
