"""The whole method inside the graph: only logits and ``[B, grid_h, grid_w]`` masks come out.

Why: on a GPU the numpy maths and the copy of one ``[B, N, N]`` map per layer off the device were
38-73% of an explanation (README, CUDA table). Here the maths of :mod:`vit_explain.methods`
(fusion, discard, identity + row normalisation, the row-vector chain, the scaling to max 1) is
written in plain ONNX operators and appended to the head-fused graph of
:func:`.variants.fused_maps`, so one session runs model and method in one call and onnxruntime
plans the memory of both. Appending at load time (not at export, not a second session chained
by I/O binding) keeps every file of this format usable, holds the weights once, and needs no
device buffer to be handed between sessions.

The settings that change per call are graph inputs, so one session serves them all:
:data:`INPUT_KEEP` (how many entries of a map the discard keeps, ``N*N - int(N*N*ratio)``) and
:data:`INPUT_START_LAYER`. A layer before the start layer is computed and then passed over
(``Where``), which costs one ``N x N`` step, nothing of the model.

Every step follows the numpy path's dtypes and order: max/min maps are discarded in float32 and
then widened, everything else is float64; the chain runs last layer first. The discard is exact
rank selection with numpy's tie-breaking (:func:`vit_explain.methods.selection.discard_lowest`:
of entries tied at the cut, the first ones in row order go): ONNX ``TopK`` keeps the ``keep``
largest entries preferring the lower index on ties, so it runs on the reversed row, where a
lower index is a later entry. NaN maps are not given numpy's treatment (a NaN mask either way).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..metadata import OUTPUT_LOGITS, ModelMetadata
from ..methods.chain import TokenLayout
from ..methods.registry import METHODS
from .variants import FUSED_OUTPUT, fused_maps, top1_class_weights
from .walk import prune

__all__ = [
    "INPUT_KEEP",
    "INPUT_START_LAYER",
    "OUTPUT_MASKS",
    "IN_GRAPH_METHODS",
    "MethodGraphBuilder",
    "method_graph",
    "method_inputs",
    "unsupported_layout",
]

INPUT_KEEP = "discard_keep"  # int64 [1]: entries each map keeps after the discard
INPUT_START_LAYER = "start_layer"  # int64 []: the first layer of the chain
OUTPUT_MASKS = "masks"
_PREFIX = "vit_explain_method_"
#: Every method of the registry has its maths here.
IN_GRAPH_METHODS = tuple(METHODS)


#: The fields of the metadata and of the token layout this maths was written for: a field added
#: later (a new kind of seed, windows) may change the maths, so the numpy path runs until the
#: method graph learns it (then add it here).
_KNOWN_METADATA = frozenset({
    "source_model", "weights", "weights_sha256", "preprocess", "patch_size", "grid_size", "num_prefix_tokens",
    "has_class_token", "num_layers", "num_heads", "num_outputs", "output_kind", "opset", "package_version",
    "class_names", "pooling", "format_version", "extra", "seed_weights", "windows",
})
#: The seed row is the numpy path's own (:meth:`TokenLayout.seed`, a constant of the graph), so any
#: seed these fields describe is followed exactly.
_KNOWN_LAYOUT = frozenset({"num_prefix_tokens", "has_class_token", "seed_weights"})


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def token_layout(metadata: ModelMetadata) -> TokenLayout:
    """The file's token layout: each of :class:`TokenLayout`'s fields read from the metadata field
    of that name (a layout field the metadata does not have is refused by :func:`unsupported_layout`)."""
    return TokenLayout(**{name: getattr(metadata, name) for name in _fields(TokenLayout) if hasattr(metadata, name)})


def unsupported_layout(metadata: ModelMetadata, attentions: onnx.ValueInfoProto | None) -> str | None:
    """Why the in-graph maths does not know this model's layout, or None when it does.

    It knows one: every block's attention ``[B, heads, N, N]`` over the same ``N`` tokens, stacked
    ``[L, B, heads, N, N]``, the prefix tokens first, read by the class token or the mean of the
    patch rows. Anything else (windowed blocks, token counts that change between blocks, fields
    of the metadata it has not met) runs the numpy path instead."""
    if getattr(metadata, "windows", None) is not None:
        return "its blocks attend within windows (Swin), which the in-graph maths does not follow"
    if attentions is None:
        return "the graph has no stacked attentions output"
    dims = attentions.type.tensor_type.shape.dim
    tokens = metadata.num_tokens
    if len(dims) != 5 or any(d.HasField("dim_value") and d.dim_value != tokens for d in dims[3:]):
        return f"its attentions are not [layers, batch, heads, {tokens}, {tokens}]"
    if dims[0].HasField("dim_value") and dims[0].dim_value != metadata.num_layers:
        return "its attentions do not hold one map per layer"
    layout_fields = _fields(TokenLayout)
    new_fields = sorted((_fields(type(metadata)) - _KNOWN_METADATA) | (layout_fields - _KNOWN_LAYOUT)
                        | (layout_fields - _fields(type(metadata))))
    if new_fields:  # e.g. another seed than the class token's row or the patch rows' mean
        return f"the in-graph maths does not know the layout fields {', '.join(new_fields)}"
    if set(metadata.extra) - {"precision"}:
        return f"its metadata has fields the in-graph maths does not know ({', '.join(sorted(metadata.extra))})"
    return None


def method_inputs(method: str, discard_ratio: float | None, start_layer: int, tokens: int) -> dict[str, np.ndarray]:
    """The feeds for the settings inputs the method's graph has (see :func:`method_graph`)."""
    record = METHODS[method]
    feeds: dict[str, np.ndarray] = {}
    if record.uses_discard_ratio:
        entries = tokens * tokens
        feeds[INPUT_KEEP] = np.array([entries - int(entries * float(discard_ratio))], dtype=np.int64)
    if record.uses_start_layer:
        feeds[INPUT_START_LAYER] = np.array(start_layer, dtype=np.int64)
    return feeds


class MethodGraphBuilder:
    """Writes the method's nodes after a value holding the fused maps ``[L, B, N, N]``.

    Separate from :func:`method_graph` so the maths can also be run on its own, on fused maps
    given as an input (the tests feed it maps full of ties)."""

    def __init__(self, layers: int, tokens: int, layout: TokenLayout, grid: tuple[int, int]) -> None:
        self.layers, self.tokens, self.layout, self.grid = layers, tokens, layout, grid
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    # -- writing nodes ----------------------------------------------------------------------
    def add(self, op: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        name = f"{_PREFIX}{len(self.nodes)}_{op.lower()}"
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, **attributes))
        return output or name

    def constant(self, name: str, value: np.ndarray) -> str:
        full = f"{_PREFIX}{name}"
        if all(t.name != full for t in self.initializers):
            self.initializers.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def ints(self, *values: int) -> str:
        return self.constant("i64_" + "_".join(str(v).replace("-", "m") for v in values), np.array(values, np.int64))

    # -- the maths --------------------------------------------------------------------------
    def discard(self, fused: str, dtype: int) -> str:
        """``[B, N, N]`` with all but the ``keep`` largest entries zeroed, numpy's ties and the
        class token's attention to itself (flat index 0) always kept."""
        entries = self.tokens * self.tokens
        flat = self.add("Reshape", [fused, self.ints(-1, entries)])
        reversed_flat = self.add("Slice", [flat, self.ints(-1), self.ints(-(2**63)), self.ints(1), self.ints(-1)])
        _, reversed_at = self._top_k(reversed_flat)
        at = self.add("Sub", [self.constant("last", np.array(entries - 1, np.int64)), reversed_at])
        zero_one = np.zeros((1, entries), dtype=np.float32 if dtype == TensorProto.FLOAT else np.float64)
        zero_one[0, 0] = 1.0  # flat index 0 is kept whatever its rank
        base = self.add("Expand", [self.constant(f"first_{dtype}", zero_one), self.add("Shape", [flat])])
        ones = self.add("ConstantOfShape", [self.add("Shape", [at])],
                        value=helper.make_tensor("one", dtype, [1], [1.0]))
        keep = self.add("ScatterElements", [base, at, ones], axis=1)
        kept = self.add("Mul", [flat, keep])
        return self.add("Reshape", [kept, self.ints(-1, self.tokens, self.tokens)])

    def _top_k(self, values: str) -> tuple[str, str]:
        name = f"{_PREFIX}{len(self.nodes)}_topk"
        outputs = [f"{name}_values", f"{name}_indices"]
        self.nodes.append(helper.make_node("TopK", [values, INPUT_KEEP], outputs, name=name, axis=1, largest=1, sorted=0))
        return outputs[0], outputs[1]

    def rollout_step(self, row: str, fused: str) -> str:
        """``(row / d) @ F + row / d``, d the row sums of ``F + I`` (:func:`.chain.rollout_step`)."""
        sums = self.add("Add", [self.add("ReduceSum", [fused, self.ints(-1)], keepdims=0), self.constant("one_f64", np.array(1.0))])
        scaled = self.add("Div", [row, self.add("Unsqueeze", [sums, self.ints(1)])])
        return self.add("Add", [self.add("MatMul", [scaled, fused]), scaled])

    def chain(self, maps: str, dtype: int, method: str) -> str:
        """The seed row through every layer, last first: ``[B, 1, N]`` float64."""
        record = METHODS[method]
        row = self.constant("seed", self.layout.seed(1, self.tokens))  # [1, 1, N]: broadcast over B
        order = [self.layers - 1] if not record.uses_start_layer else range(self.layers - 1, -1, -1)
        for layer in order:
            fused = self.add("Gather", [maps, self.constant(f"layer_{layer}", np.array(layer, np.int64))], axis=0)
            if record.uses_discard_ratio:
                fused = self.discard(fused, dtype)
            if dtype != TensorProto.DOUBLE:
                fused = self.add("Cast", [fused], to=TensorProto.DOUBLE)
            if method in ("rollout", "grad_rollout"):
                stepped = self.rollout_step(row, fused)
            elif method == "gae":
                stepped = self.add("Add", [row, self.add("MatMul", [row, fused])])
            else:  # attention: the last layer alone
                stepped = self.add("MatMul", [row, fused])
            if record.uses_start_layer:
                here = self.add("GreaterOrEqual", [self.constant(f"layer_{layer}", np.array(layer, np.int64)), INPUT_START_LAYER])
                stepped = self.add("Where", [here, stepped, row])
            row = stepped
        return row

    def masks(self, row: str) -> str:
        """``[B, 1, N]`` -> the patch tokens' relevance scaled to max 1 (an all-zero row stays
        zero), float32 ``[B, grid_h, grid_w]`` (:func:`.chain.rows_to_masks`)."""
        patches = self.add("Slice", [row, self.ints(self.layout.num_prefix_tokens), self.ints(self.tokens), self.ints(2)])
        peak = self.add("ReduceMax", [patches, self.ints(2)], keepdims=1)
        positive = self.add("Greater", [peak, self.constant("zero_f64", np.array(0.0))])
        scaled = self.add("Div", [patches, self.add("Where", [positive, peak, self.constant("one_f64", np.array(1.0))])])
        scaled = self.add("Where", [positive, scaled, self.constant("zero_f64", np.array(0.0))])
        return self.add("Reshape", [self.add("Cast", [scaled], to=TensorProto.FLOAT), self.ints(-1, *self.grid)], OUTPUT_MASKS)

    def build(self, maps: str, dtype: int, method: str) -> None:
        """Every node from ``maps`` to :data:`OUTPUT_MASKS`, and the settings inputs the method reads."""
        record = METHODS[method]
        if record.uses_discard_ratio:
            self.inputs.append(helper.make_tensor_value_info(INPUT_KEEP, TensorProto.INT64, [1]))
        if record.uses_start_layer:
            self.inputs.append(helper.make_tensor_value_info(INPUT_START_LAYER, TensorProto.INT64, []))
        self.masks(self.chain(maps, dtype, method))

    def output(self) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(OUTPUT_MASKS, TensorProto.FLOAT, ["batch", *self.grid])


def method_graph(
    model: onnx.ModelProto, method: str, head_fusion: str | None, top1: bool, metadata: ModelMetadata
) -> onnx.ModelProto:
    """Logits and :data:`OUTPUT_MASKS` from ``model`` (the file's graph): the fused graph of
    ``method`` (for ``attention``: rollout's, of which the last layer is read) with the method's
    maths appended. ``top1``: the class-specific methods explain each image's top-1 output."""
    if method not in IN_GRAPH_METHODS:
        raise ValueError(f"no in-graph maths for method {method!r}")
    fused_as = "rollout" if method == "attention" else method
    source = fused_maps(model, fused_as, head_fusion)
    if top1 and METHODS[method].class_specific:
        source = top1_class_weights(source, metadata.output_kind)
    graph = source.graph
    fused_output = next(o for o in graph.output if o.name == FUSED_OUTPUT)
    dtype = fused_output.type.tensor_type.elem_type
    layout = token_layout(metadata)
    builder = MethodGraphBuilder(metadata.num_layers, metadata.num_tokens, layout, tuple(metadata.grid_size))
    builder.build(FUSED_OUTPUT, dtype, method)
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    graph.input.extend(builder.inputs)
    graph.output.append(builder.output())
    return prune(source, [OUTPUT_LOGITS, OUTPUT_MASKS])
