"""Checks of a model file from elsewhere, before any session or buffer is sized from it.

A file received from someone else is data, not code: its external weights must stay inside its
own folder, and its metadata must agree with the shapes its graph declares, so that a wrong
field is named as such instead of surfacing later as a shape error deep in onnxruntime or numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from ..errors import ModelFileError
from ..metadata import INPUT_CLASS_WEIGHTS, INPUT_PIXELS, OUTPUT_ATTENTIONS, OUTPUT_LOGITS, MetadataError, ModelMetadata
from ..windowing import WindowLayoutError, layout_of

__all__ = ["check_external_data", "check_graph_shapes"]


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and node attributes, subgraphs included
    (an ``If`` branch holds its own initializers and constants)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _tensors(subgraph)


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse weights stored in files outside the model's own folder: an absolute location, a
    ``..`` or a symbolic link leading out. Such a file, received from elsewhere, would make
    loading it read whatever its author chose on this machine (``/dev/zero``, someone's keys)."""
    folder = path.parent.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder) or target == folder:
            raise ModelFileError(
                f"{path}: refused, the weights of {tensor.name!r} are stored in {location!r}, "
                "which is not a file inside the model's own folder"
            )


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """A graph input's or output's declared shape; ``None`` for a symbolic or unknown dim."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _shown(dims: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _mismatch(field_name: str, claimed: object, graph_part: str, actual: Sequence[int | None]) -> MetadataError:
    return MetadataError(f"metadata field '{field_name}' is {claimed}, but the graph's {graph_part} is {_shown(actual)}")


def check_graph_shapes(meta: ModelMetadata, model: onnx.ModelProto) -> None:
    """The metadata against the graph it describes, which cannot lie about its own shapes:
    pixel input ``[batch, 3, H, W]``, logits and class weights ``[batch, outputs]``,
    attentions ``[layers, batch, heads, tokens, tokens]`` with tokens = prefix + grid cells.
    Batch dims are symbolic and not compared. Each step trusts only what the steps before it
    checked against the graph, so the message blames the right field: the grid is checked
    against the (graph's) input size, class names against the (graph's) output count, and a
    token mismatch left after that can only be the prefix count."""
    shapes = {value.name: _declared_dims(value) for value in [*model.graph.input, *model.graph.output]}
    pixels = shapes[INPUT_PIXELS]
    if len(pixels) != 4 or tuple(pixels[1:]) != tuple(meta.preprocess.input_size):
        raise _mismatch("preprocess.input_size", _shown(meta.preprocess.input_size), "pixel input (channels x H x W)", pixels[1:])
    meta.check_layout()
    for name in (OUTPUT_LOGITS, INPUT_CLASS_WEIGHTS):
        dims = shapes[name]
        if len(dims) != 2 or dims[1] != meta.num_outputs:
            raise _mismatch("num_outputs", meta.num_outputs, f"{name!r} width", dims[1:])
    meta.check_class_names()
    attentions = shapes[OUTPUT_ATTENTIONS]
    try:
        layout = layout_of(meta)
    except WindowLayoutError as exc:
        raise MetadataError(str(exc)) from None
    if layout is not None:  # windowed (Swin): every block's windows packed per image
        if len(attentions) != 2 or attentions[1] != layout.packed_values:
            raise _mismatch("windows", f"{layout.packed_values} attention values per image", "attentions", attentions)
        return
    if len(attentions) != 5:
        raise MetadataError(f"the graph's attentions are {_shown(attentions)}, not [layers, batch, heads, tokens, tokens]")
    layers, _, heads, rows, columns = attentions
    if layers != meta.num_layers:
        raise _mismatch("num_layers", meta.num_layers, "attention layer count", [layers])
    if heads != meta.num_heads:
        raise _mismatch("num_heads", meta.num_heads, "attention head count", [heads])
    if rows != columns or rows != meta.num_tokens:
        grid = _shown(meta.grid_size)
        raise _mismatch(
            "num_prefix_tokens", f"{meta.num_prefix_tokens} (with the {grid} grid: {meta.num_tokens} tokens)",
            "attention token count", [rows],
        )
    meta.check_seed_count()
