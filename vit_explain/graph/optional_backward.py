"""Make the backward half of the exported graph optional, inside the same file.

onnxruntime executes every node of a graph whatever outputs are requested, so a graph that
returns attention gradients would make plain rollout pay for a backward pass. Rather than
storing a second, forward-only model (and the weights twice), the nodes that only the gradient
output needs are moved into the ``then`` branch of an ``If`` on a boolean input
``compute_gradients``; the ``else`` branch returns an empty tensor. Forward values and weights
are read from the outer scope, so everything is stored once.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..metadata import (
    INPUT_CLASS_WEIGHTS,
    INPUT_COMPUTE_GRADIENTS,
    INPUT_PIXELS,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from .walk import needed_nodes

__all__ = ["make_gradients_optional"]

_GRADIENT_DIMS = ["layers", "batch", "heads", "tokens", "tokens"]


def _batch_size_from_pixels(graph: onnx.GraphProto, forward_nodes: set[int]) -> None:
    """Make the forward nodes read the batch size from the pixels, never from the class weights.

    Both inputs share the symbolic batch dimension, so the exporter may take ``Shape`` of either;
    the forward-only graph the runtime cuts from this one has no class-weights input at all.
    """
    for index in forward_nodes:
        node = graph.node[index]
        if INPUT_CLASS_WEIGHTS not in node.input:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Shape" or attributes.get("start", 0) != 0 or attributes.get("end") != 1:
            raise ValueError(f"the forward graph reads the class weights in {node.op_type} {node.name}")
        node.input[0] = INPUT_PIXELS


def _gradient_dims(graph: onnx.GraphProto) -> list[str]:
    """The gradient output's dims, named: ``[L, B, heads, N, N]``, or a windowed model's packed
    ``[B, values]`` (the rank of the attentions output, which the gradients share)."""
    attentions = next((o for o in graph.output if o.name == OUTPUT_ATTENTIONS), None)
    rank = len(attentions.type.tensor_type.shape.dim) if attentions is not None else len(_GRADIENT_DIMS)
    return ["batch", "values"] if rank == 2 else _GRADIENT_DIMS


def make_gradients_optional(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose gradient output is computed only when asked for."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    forward_nodes = needed_nodes(graph, [OUTPUT_LOGITS, OUTPUT_ATTENTIONS])
    _batch_size_from_pixels(graph, forward_nodes)
    forward = [node for index, node in enumerate(graph.node) if index in forward_nodes]
    backward = [node for index, node in enumerate(graph.node) if index not in forward_nodes]
    if not backward:
        raise ValueError("the graph has no gradient nodes to make optional")

    inner_name = OUTPUT_GRADIENTS + "_computed"
    for node in backward:
        for k, name in enumerate(node.output):
            if name == OUTPUT_GRADIENTS:
                node.output[k] = inner_name
    backward_values = {name for node in backward for name in node.output}
    then_value_info = [vi for vi in graph.value_info if vi.name in backward_values]
    outer_value_info = [vi for vi in graph.value_info if vi.name not in backward_values]

    dims = _gradient_dims(graph)
    dynamic = helper.make_tensor_value_info(inner_name, TensorProto.FLOAT, dims)
    then_branch = helper.make_graph(backward, "attention_gradients", [], [dynamic], value_info=then_value_info)
    empty = helper.make_tensor("no_gradients", TensorProto.FLOAT, [0] * len(dims), [])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["no_gradients"], value=empty)],
        "no_attention_gradients",
        [],
        [helper.make_tensor_value_info("no_gradients", TensorProto.FLOAT, dims)],
    )
    branch = helper.make_node(
        "If", [INPUT_COMPUTE_GRADIENTS], [OUTPUT_GRADIENTS], name="optional_backward",
        then_branch=then_branch, else_branch=else_branch,
    )

    del graph.node[:]
    graph.node.extend(forward + [branch])
    del graph.value_info[:]
    graph.value_info.extend(outer_value_info)
    graph.input.append(helper.make_tensor_value_info(INPUT_COMPUTE_GRADIENTS, TensorProto.BOOL, []))
    for output in graph.output:
        if output.name == OUTPUT_GRADIENTS:
            output.CopyFrom(helper.make_tensor_value_info(OUTPUT_GRADIENTS, TensorProto.FLOAT, dims))
    onnx.checker.check_model(model)
    return model
