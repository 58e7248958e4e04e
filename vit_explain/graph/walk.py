"""The one walker over an ONNX graph's data flow: what a node reads, what an output needs.

Export (making the backward pass optional) and the runtime (pruning its variants) ask the same
question, which nodes a set of outputs depends on; both ask it here, so an ``If`` branch that
reads outer values by name is followed the same way on both sides.
"""

from __future__ import annotations

import heapq

import onnx

__all__ = ["node_reads", "needed_nodes", "prune", "topologically_sorted", "copy_model"]


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including those its subgraphs (``If`` branches) read from the outer
    scope: a branch's nodes name outer values directly, so ``node.input`` alone would miss them."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                names.update(name for name in node_reads(inner) if name not in local)
            names.update(o.name for o in graph.output if o.name not in local)
    names.discard("")
    return names


def needed_nodes(graph: onnx.GraphProto, outputs: list[str]) -> set[int]:
    """Indices of the nodes needed to compute ``outputs`` (graph inputs and initializers are
    leaves). One backward sweep: an ONNX graph lists its nodes in topological order."""
    needed_names = set(outputs)
    needed: set[int] = set()
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if needed_names.intersection(node.output):
            needed.add(index)
            needed_names.update(node_reads(node))
    return needed


def prune(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """Keep only the nodes, inputs and initializers that ``outputs`` depend on (in place)."""
    graph = model.graph
    known_outputs = {o.name: o for o in graph.output}
    missing = [name for name in outputs if name not in known_outputs]
    if missing:
        raise ValueError(f"graph has no output(s) {missing}")
    kept_indices = needed_nodes(graph, outputs)
    kept_nodes = [node for index, node in enumerate(graph.node) if index in kept_indices]
    needed = set(outputs)
    for node in kept_nodes:
        needed.update(node_reads(node))
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.output[:]
    graph.output.extend(known_outputs[name] for name in outputs)
    kept_inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    return model


def topologically_sorted(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the producers of what it reads (Kahn's
    algorithm; nodes already in order keep it). Needed after splicing new nodes into a graph
    whose consumers already exist, as :func:`.variants.top1_class_weights` does."""
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    waiting_on = []
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        sources = {producer[name] for name in node_reads(node) if name not in available and name in producer}
        waiting_on.append(len(sources))
        for source in sources:
            readers.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting_on) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for reader in readers.get(index, ()):
            waiting_on[reader] -= 1
            if waiting_on[reader] == 0:
                heapq.heappush(ready, reader)
    if len(ordered) != len(nodes):
        raise ValueError("the graph has a cycle")
    return ordered


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: the variants edit their graph in place, never the caller's."""
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
