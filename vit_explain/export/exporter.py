"""``export``: a model (built by its family's adapter) -> checked, self-describing ONNX file, written once and atomically."""

from __future__ import annotations

import gc
import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_write_bytes
from ..eager import weights_sha256
from ..errors import ExportError
from ..families import ModelFamily, ModelSpec, family_for
from ..graph import make_gradients_optional
from ..metadata import METADATA_KEY, ModelMetadata
from ..windowing import layout_of
from .memory import (
    ModelShape,
    available_memory_bytes,
    check_batch_size,
    estimate_export_bytes,
)
from .precision import PRECISIONS, convert_checked
from .tracing import DEFAULT_OPSET, export_onnx, trace_explain_graph
from .verify import ParityReport, check_parity

__all__ = ["ExportResult", "export_model", "describe_model", "default_output_path"]

_PROTOBUF_LIMIT = 2 * 1024**3 - 1
#: Progress and notices, one line each (INFO); the CLI's ``export`` prints them to stderr.
_log = logging.getLogger("vit_explain.export")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    parity: ParityReport
    size_bytes: int


def default_output_path(spec: ModelSpec, models_dir: Path = Path("models")) -> Path:
    suffix = ""
    if spec.img_size is not None:
        suffix += f"_{spec.img_size[0]}x{spec.img_size[1]}"
    if spec.weights == "random":
        suffix += f"_random{spec.seed}"
    elif spec.weights != "pretrained":
        suffix += f"_{Path(spec.weights).stem}"
    return models_dir / f"{spec.file_stem}{suffix}.onnx"


def describe_model(
    model: nn.Module, spec: ModelSpec, class_names_file: Path | None = None, opset: int = DEFAULT_OPSET
) -> ModelMetadata:
    """The metadata of ``model``, from its family's answers (layout, seed, outputs, preprocessing),
    after the family has refused what cannot be explained."""
    family = family_for(spec, model)
    family.check(model)
    layout = family.layout(model)
    reading = family.head_reading(model)
    num_layers, num_heads, _ = family.depth(model)
    num_outputs, output_kind = family.outputs(model)
    return ModelMetadata(
        source_model=spec.name,
        weights=spec.weights_label,
        weights_sha256=weights_sha256(model),
        preprocess=family.preprocess(model),
        patch_size=layout.patch_size,
        grid_size=layout.grid_size,
        num_prefix_tokens=layout.num_prefix_tokens,
        has_class_token=reading.has_class_token,
        pooling=reading.pooling,
        seed_weights=reading.seed_weights,
        num_layers=num_layers,
        num_heads=num_heads,
        num_outputs=num_outputs,
        output_kind=output_kind,
        opset=opset,
        package_version=__version__,
        class_names=family.class_names(model, num_outputs, class_names_file) if output_kind == "logits" else (),
        windows=family.windows(model),
    )


def model_shape(model: nn.Module, spec: ModelSpec, metadata: ModelMetadata) -> ModelShape:
    """The sizes the export's memory depends on, read from the built model."""
    tokens = metadata.grid_size[0] * metadata.grid_size[1] + metadata.num_prefix_tokens
    _, _, width = family_for(spec, model).depth(model)
    tensors = list(model.parameters()) + list(model.buffers())
    parameter_bytes = sum(t.numel() * t.element_size() for t in tensors)
    windows = layout_of(metadata)  # windowed: the attention is the windows', not tokens^2
    values = None if windows is None else windows.packed_values
    return ModelShape(metadata.num_layers, metadata.num_heads, tokens, width, parameter_bytes, values)


def export_command(spec: ModelSpec, output: Path | None, class_names_file: Path | None, opset: int) -> str:
    """The ``vit-explain export`` command line that exports ``spec`` (to paste from a message)."""
    words = ["vit-explain", "export", spec.name]
    if spec.weights != "pretrained":
        words += ["--weights", spec.weights]
    if spec.weights == "random" and spec.seed:
        words += ["--seed", str(spec.seed)]
    if spec.img_size is not None:
        height, width = spec.img_size
        words += ["--img-size", str(height) if height == width else f"{height}x{width}"]
    if spec.num_classes is not None:
        words += ["--num-classes", str(spec.num_classes)]
    if class_names_file is not None:
        words += ["--class-names", str(class_names_file)]
    if output is not None:
        words += ["-o", str(output)]
    if opset != DEFAULT_OPSET:
        words += ["--opset", str(opset)]
    return shlex.join(words)


def _smaller_size_that_fits(metadata: ModelMetadata, shape: ModelShape, available: int) -> tuple[int, int] | None:
    """The largest input (whole patches, same aspect ratio) whose export fits in ``available``."""
    grid_h, grid_w = metadata.grid_size
    patch_h, patch_w = metadata.patch_size
    for rows in range(grid_h - 1, 0, -1):
        columns = max(1, round(rows * grid_w / grid_h))
        tokens = rows * columns + metadata.num_prefix_tokens
        values = shape.attention_values  # windowed: linear in the tokens
        values = None if values is None else values * tokens // shape.tokens
        if estimate_export_bytes(replace(shape, tokens=tokens, attention_values=values)) <= available:
            return rows * patch_h, columns * patch_w
    return None


def _refuse_when_too_big(
    spec: ModelSpec, metadata: ModelMetadata, shape: ModelShape, output: Path, class_names_file: Path | None, opset: int
) -> None:
    """Refuse, before tracing, an export that would not fit in memory (else the kernel kills it
    minutes later, in the parity check, without a word); the message says what would fit."""
    if shape.parameter_bytes > _PROTOBUF_LIMIT:
        raise ExportError(
            f"{spec.name} has {shape.parameter_bytes / 1e9:.1f} GB of weights; models over 2 GB (ONNX protobuf limit) "
            "are not supported yet"
        )
    available = available_memory_bytes()
    needed = estimate_export_bytes(shape)
    if available is None or needed <= available:
        return
    height, width = metadata.preprocess.input_size[1:]
    head = (
        f"exporting {spec.name} at {height}x{width} px needs about {needed / 1e9:.1f} GB of memory "
        f"and {available / 1e9:.1f} GB is available"
    )
    smaller = _smaller_size_that_fits(metadata, shape, available)
    if smaller is None:
        raise ExportError(f"{head}; free some memory or use a larger machine")
    command = export_command(replace(spec, img_size=smaller), output, class_names_file, opset)
    raise ExportError(f"{head}; a smaller --img-size fits: {command}")


def _cropped_notice(metadata: ModelMetadata) -> str | None:
    """A note when the input size is not whole patches: timm's patch embedding drops the rest."""
    height, width = metadata.preprocess.input_size[1:]
    (grid_h, grid_w), (patch_h, patch_w) = metadata.grid_size, metadata.patch_size
    used_h, used_w = grid_h * patch_h, grid_w * patch_w
    if (used_h, used_w) == (height, width):
        return None
    fitted = str(used_h) if used_h == used_w else f"{used_h}x{used_w}"
    return (
        f"note: {height}x{width} px is not a multiple of the {patch_h}x{patch_w} patch: the model sees the top-left "
        f"{used_h}x{used_w} px and ignores the last {height - used_h} rows and {width - used_w} columns "
        f"(--img-size {fitted} uses every pixel)"
    )


def export_model(
    spec: ModelSpec,
    output: Path,
    class_names_file: Path | None = None,
    opset: int = DEFAULT_OPSET,
    model: nn.Module | None = None,
    precision: str = "fp32",
) -> ExportResult:
    """Build, trace, convert, check against eager PyTorch, then save; nothing is written on failure.

    ``precision="fp16"``: the checked graph converted to float16 (:mod:`.precision`), refused
    when it misses the stated bounds against the float32 graph.
    ``model`` skips building from ``spec`` (tests export small, hand-made models this way);
    ``spec`` then only names it in the metadata. An export that would not fit in memory is
    refused before tracing. Progress goes to the ``vit_explain.export`` logger (INFO).
    """
    family = family_for(spec)
    if model is None:
        _log.info("loading %s (%s)", spec.name, spec.weights_label)
        model = family.build(spec)
    model = model.eval()
    family = family_for(spec, model)
    metadata = describe_model(model, spec, class_names_file, opset)
    shape = model_shape(model, spec, metadata)
    _refuse_when_too_big(spec, metadata, shape, output, class_names_file, opset)
    notice = _cropped_notice(metadata)
    if notice:
        _log.info("%s", notice)
    proto = _trace_and_convert(model, metadata, opset, family)

    _log.info("checking the graph against the eager model")
    parity = check_parity(
        proto, model, metadata.preprocess.input_size, metadata.num_outputs, check_batch_size(shape), family
    )
    if precision == "fp16":  # converted from the checked graph, kept within stated bounds
        _log.info("converting to float16 and checking it against the float32 graph")
        proto, metadata, half = convert_checked(proto, metadata)
        _log.info("%s", half.summary())
    elif precision != "fp32":
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError("models over 2 GB (ONNX protobuf limit) are not supported yet")
    data = proto.SerializeToString()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, data)
    _log.info("saved %s (%.1f MB); parity: %s", output, len(data) / 1e6, parity.summary())
    return ExportResult(output, metadata, parity, len(data))


def _trace_and_convert(model: nn.Module, metadata: ModelMetadata, opset: int, family: ModelFamily) -> onnx.ModelProto:
    """The checked-to-be ONNX proto, with every tracing and conversion object freed on return:
    torch.export and the ONNX exporter leave reference cycles that would otherwise hold their
    graphs and copies through the parity check, the export's peak."""
    example = torch.randn(2, *metadata.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    _log.info("tracing forward + attention gradients")
    graph = trace_explain_graph(model, example, metadata.num_outputs, family)
    _log.info("converting to ONNX (opset %s)", opset)
    proto = make_gradients_optional(export_onnx(graph, example, metadata.num_outputs, opset))
    del graph
    gc.collect()
    proto.producer_name = "vit-explain"
    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata.to_json()})
    return proto
