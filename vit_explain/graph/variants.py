"""Graphs derived from the one exported file, each computing only what one kind of call needs.

The exported file holds the whole interface: logits, every layer's attention ``[L, B, heads,
N, N]`` and, behind an ``If`` on ``compute_gradients``, every layer's attention gradient. A
method rarely needs all of that. Rollout, gradient rollout and GAE only read one head-fused
``[L, B, N, N]`` map per layer, so returning the raw per-head tensors and fusing them in numpy
moves ``heads`` times more data out of the graph (and, on CUDA, over the bus) than the maths
needs. The variants here are built from the file at load time, with plain ONNX operators, so
any file of this format gets them and the file keeps its raw outputs for those who want them:

- :func:`forward_only`: logits and raw attentions, no backward branch.
- :func:`gradients_inlined`: the ``If`` replaced by its ``then`` branch, so the gradient
  session has no control flow for onnxruntime to optimise around.
- :func:`top1_class_weights`: the class weights chosen from the graph's own logits (top-1), so
  explaining the predicted class takes one call, not a forward pass and then a second one.
- :func:`per_layer_outputs`: one output per layer instead of the ``[L, ...]`` stacks, which
  onnxruntime would otherwise copy twice.
- :func:`fused_maps`: the per-layer head-fused map a method reads, as output ``fused_maps``
  (see :data:`FUSED_OUTPUT`), and nothing raw.

- :func:`derive`: the one place that maps a runtime session kind to the variant it runs, so
  each is built once per model and kind (the session caches it), never per call.

Fusion dtypes follow the numpy maths in :mod:`vit_explain.runtime.rollout` exactly: max and min pick float32
values, so they stay float32; a mean, and the attention x gradient product, are computed in
float64 (the product of two float32 numbers is exact in float64).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelFileError
from ..metadata import (
    INPUT_CLASS_WEIGHTS,
    INPUT_COMPUTE_GRADIENTS,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from ..methods import CLASS_SPECIFIC_METHODS, METHODS
from .walk import copy_model, prune, topologically_sorted

__all__ = ["FUSED_OUTPUT", "FUSED_METHODS", "forward_only", "gradients_inlined", "per_layer_outputs", "top1_class_weights", "fused_maps",
           "SessionKind", "fused_kind", "derive"]

FUSED_OUTPUT = "fused_maps"
#: Methods whose maths reads one head-fused map per layer: the registry's ``fusable_in_graph``
#: (``attention`` reads the raw last layer).
FUSED_METHODS = tuple(method.name for method in METHODS.values() if method.fusable_in_graph)
_REDUCERS = {"mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}
_PREFIX = "vit_explain_fuse_"


def forward_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pixels in, logits and raw attentions out: the backward branch and its inputs dropped.

    Besides speed this matters for memory: in the full graph the forward values the backward
    branch reads stay alive until the ``If`` runs, even when it takes the empty branch.
    """
    pruned = prune(copy_model(model), [OUTPUT_LOGITS, OUTPUT_ATTENTIONS])
    if any(i.name == INPUT_CLASS_WEIGHTS for i in pruned.graph.input):
        raise ModelFileError("the model's forward graph reads the class weights: re-export it with this vit-explain")
    return pruned


def gradients_inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """The whole interface with the ``If`` on ``compute_gradients`` replaced by its ``then`` branch.

    The branch's nodes read the outer graph's values by name, so they can sit in the outer graph
    as they are; an ``Identity`` gives its result the ``If``'s output name. The
    ``compute_gradients`` input is then unused and dropped: this graph always computes them.
    """
    inlined = copy_model(model)
    graph = inlined.graph
    nodes = []
    found = False
    for node in graph.node:
        # (its output may reach ``attention_gradients`` through a Cast: a float16 file, see
        # :mod:`vit_explain.export.precision`)
        if node.op_type == "If" and list(node.input) == [INPUT_COMPUTE_GRADIENTS]:
            branch = next(a.g for a in node.attribute if a.name == "then_branch")
            nodes.extend(branch.node)
            graph.initializer.extend(branch.initializer)
            for branch_output, outer in zip(branch.output, node.output, strict=False):
                nodes.append(helper.make_node("Identity", [branch_output.name], [outer], name=f"{_PREFIX}{outer}"))
            found = True
        else:
            nodes.append(node)
    if not found:
        raise ValueError("the graph has no gradient branch (If on compute_gradients) to inline")
    del graph.node[:]
    graph.node.extend(nodes)
    return prune(inlined, [OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS])


def top1_class_weights(model: onnx.ModelProto, output_kind: str) -> onnx.ModelProto:
    """The gradients explain each image's own output, chosen inside the graph (in place).

    The ``class_weights`` input becomes a value computed from the logits: one-hot at the first
    maximum (``numpy.argmax``'s choice) for a classifier, the unit-length output itself for a
    feature model. Without this, explaining the top-1 class costs a forward pass to find it and
    then a second one under the backward pass.
    """
    graph = model.graph
    if not any(i.name == INPUT_CLASS_WEIGHTS for i in graph.input):
        raise ValueError("the graph has no class weights input")
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        name = output or f"{_PREFIX}top1_{len(nodes)}_{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [name], name=f"{_PREFIX}top1_{len(nodes)}", **attributes))
        return name

    def constant(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, f"{_PREFIX}top1_{name}"))
        return f"{_PREFIX}top1_{name}"

    if output_kind == "logits":
        top = add("ArgMax", [OUTPUT_LOGITS], axis=1, keepdims=1, select_last_index=0)  # [B, 1]
        classes = add("Range", [constant("zero", np.array(0, np.int64)),
                                add("Gather", [add("Shape", [OUTPUT_LOGITS]), constant("one", np.array(1, np.int64))]),
                                constant("step", np.array(1, np.int64))])  # [C]
        add("Cast", [add("Equal", [classes, top])], INPUT_CLASS_WEIGHTS, to=TensorProto.FLOAT)
    else:
        norm = add("ReduceL2", [OUTPUT_LOGITS, constant("axis", np.array([1], np.int64))], keepdims=1)
        safe = add("Where", [add("Greater", [norm, constant("zero", np.array(0, np.float32))]), norm,
                             constant("unit", np.array(1, np.float32))])
        add("Div", [OUTPUT_LOGITS, safe], INPUT_CLASS_WEIGHTS)
    inputs = [i for i in graph.input if i.name != INPUT_CLASS_WEIGHTS]
    del graph.input[:]
    graph.input.extend(inputs)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    ordered = topologically_sorted([*graph.node, *nodes], available)
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def per_layer_outputs(model: onnx.ModelProto, names: list[str], num_layers: int) -> tuple[onnx.ModelProto, dict[str, list[str] | None]]:
    """The stacked outputs ``names`` (``[L, B, ...]``) replaced by one output per layer (in place).

    The exporter stacks the per-layer tensors with a ``Concat`` along the first axis and a
    ``Reshape`` to ``[L, B, ...]``: two copies of every attention (and gradient) map, about 2%
    of a gradient call, and the numpy maths then reads the stack one layer at a time anyway.
    Here the ``Concat``'s inputs themselves become the graph's outputs, so onnxruntime returns
    the very tensors it computed. Returns the graph (pruned to logits and those outputs) and,
    per name, its layers' output names in layer order, or ``None`` where the graph does not have
    that shape (then the stacked output is kept as it is).
    """
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    layers: dict[str, list[str] | None] = {}
    keep = [OUTPUT_LOGITS]
    for name in names:
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        stack = producer.get(node.input[0]) if node is not None and node.op_type == "Reshape" else None
        axis = next((helper.get_attribute_value(a) for a in stack.attribute if a.name == "axis"), None) if stack else None
        if stack is None or stack.op_type != "Concat" or axis != 0 or len(set(stack.input)) != num_layers:
            layers[name] = None
            keep.append(name)
            continue
        layers[name] = list(stack.input)
        declared = {o.name for o in graph.output}
        graph.output.extend(
            helper.make_tensor_value_info(value, TensorProto.FLOAT, None) for value in stack.input if value not in declared
        )
        keep.extend(stack.input)
    return prune(model, keep), layers


def fused_maps(model: onnx.ModelProto, method: str, head_fusion: str | None) -> onnx.ModelProto:
    """Logits and ``fused_maps`` ``[L, B, N, N]``, the map per layer that ``method`` reads:

    - ``rollout``: the attention, heads fused (float32 for max/min, float64 for the mean);
    - ``grad_rollout``: ``max(fuse_heads(A * G), 0)`` in float64 (fused, then clamped);
    - ``gae``: ``mean_heads(max(A * G, 0))`` in float64 (clamped per head, then averaged).
    """
    if method not in FUSED_METHODS:
        raise ValueError(f"no fused graph for method {method!r}")
    if method == "gae":
        head_fusion = "mean"
    if head_fusion not in _REDUCERS:
        raise ValueError(f"head fusion must be one of {', '.join(_REDUCERS)}, not {head_fusion!r}")
    source = forward_only(model) if method == "rollout" else gradients_inlined(model)
    graph = source.graph
    attention_output = next(o for o in graph.output if o.name == OUTPUT_ATTENTIONS)
    heads_axis = numpy_helper.from_array(np.array([2], dtype=np.int64), f"{_PREFIX}heads_axis")
    graph.initializer.append(heads_axis)
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], **attributes) -> str:
        name = f"{_PREFIX}{len(nodes)}_{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def reduce_heads(value: str, fusion: str) -> str:
        return add(_REDUCERS[fusion], [value, heads_axis.name], keepdims=0)

    if method == "rollout":
        value = OUTPUT_ATTENTIONS
        if head_fusion == "mean":
            value = add("Cast", [value], to=TensorProto.DOUBLE)
        fused = reduce_heads(value, head_fusion)
        dtype = TensorProto.DOUBLE if head_fusion == "mean" else TensorProto.FLOAT
    else:
        attention = add("Cast", [OUTPUT_ATTENTIONS], to=TensorProto.DOUBLE)
        gradient = add("Cast", [OUTPUT_GRADIENTS], to=TensorProto.DOUBLE)
        weighted = add("Mul", [attention, gradient])
        if method == "grad_rollout":
            fused = add("Relu", [reduce_heads(weighted, head_fusion)])
        else:
            fused = reduce_heads(add("Relu", [weighted]), "mean")
        dtype = TensorProto.DOUBLE
    nodes.append(helper.make_node("Identity", [fused], [FUSED_OUTPUT], name=f"{_PREFIX}output"))
    graph.node.extend(nodes)
    dims = [d for i, d in enumerate(attention_output.type.tensor_type.shape.dim) if i != 2]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    graph.output.append(helper.make_tensor_value_info(FUSED_OUTPUT, dtype, shape))
    return prune(source, [OUTPUT_LOGITS, FUSED_OUTPUT])


#: ``"full"`` (the file as it is), ``"forward"``, ``"gradients"``, ``"gradients_top1"`` or
#: ``("fused", method, head fusion, top1)``.
SessionKind = str | tuple[str, str, str | None, bool]


def fused_kind(method: str, head_fusion: str | None, top1: bool = False) -> tuple[str, str, str | None, bool]:
    """The session kind of a fused graph. A method with no head-fusion choice (GAE) has one graph
    whatever fusion is passed; ``top1`` only means something for a class-specific method."""
    choice = method not in METHODS or METHODS[method].uses_head_fusion
    return ("fused", method, head_fusion if choice else None, bool(top1 and method in CLASS_SPECIFIC_METHODS))


def derive(
    model: onnx.ModelProto, kind: SessionKind, output_kind: str, num_layers: int
) -> tuple[onnx.ModelProto, dict[str, list[str] | None]]:
    """The graph a runtime session of ``kind`` runs (``model`` is not changed), and per stacked
    output its layers' output names (see :func:`per_layer_outputs`; empty for a fused kind).

    ``forward``/``gradients``/``gradients_top1`` return one output per layer; a fused kind
    returns logits and :data:`FUSED_OUTPUT` only. ``"full"`` is the file itself: not derived."""
    if isinstance(kind, tuple):
        _, method, head_fusion, top1 = kind
        fused = fused_maps(model, method, head_fusion)
        return (top1_class_weights(fused, output_kind) if top1 else fused), {}
    if kind == "forward":
        derived, stacked = forward_only(model), [OUTPUT_ATTENTIONS]
    elif kind in ("gradients", "gradients_top1"):
        derived, stacked = gradients_inlined(model), [OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS]
        if kind == "gradients_top1":
            derived = top1_class_weights(derived, output_kind)
    else:
        raise ValueError(f"no derived graph for session kind {kind!r}")
    return per_layer_outputs(derived, stacked, num_layers)
