"""``export``: timm model -> checked, self-describing ONNX file, written once and atomically."""

from __future__ import annotations

import gc
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import __version__
from ..errors import ExportError
from ..metadata import METADATA_KEY, ModelMetadata, PreprocessConfig
from ..outputs.files import atomic_write_bytes
from ..reference import attention_modules, pooling_of, reads_class_token
from .graph_surgery import make_gradients_optional
from .loading import ModelSpec, build_model, class_names_for, weights_sha256
from .memory import ModelShape, available_memory_bytes, check_batch_size, estimate_export_bytes
from .tracing import DEFAULT_OPSET, export_onnx, trace_explain_graph
from .verify import ParityReport, check_parity

__all__ = ["ExportResult", "export_model", "describe_model", "default_output_path"]

_PROTOBUF_LIMIT = 2 * 1024**3 - 1


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
    return models_dir / f"{spec.name}{suffix}.onnx"


def _unsupported(model: nn.Module, reason: str) -> ExportError:
    return ExportError(f"{type(model).__name__} is not supported yet: {reason}")


def describe_model(model: nn.Module, spec: ModelSpec, class_names_file: Path | None = None, opset: int = DEFAULT_OPSET) -> ModelMetadata:
    """Read the token layout and preprocessing from the model itself, refusing what cannot be explained."""
    from timm.data import resolve_model_data_config

    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if blocks is None or patch_embed is None or not hasattr(patch_embed, "grid_size"):
        raise _unsupported(model, "not a Vision Transformer with blocks and a patch embedding")
    if getattr(model, "dynamic_img_size", False):
        raise _unsupported(model, "dynamic image size; export with a fixed --img-size instead")
    attentions = attention_modules(model)
    unfusable = [m for m in model.modules() if hasattr(m, "fused_attn") and not isinstance(getattr(m, "attn_drop", None), nn.Module)]
    if unfusable:
        raise _unsupported(model, f"{type(unfusable[0]).__name__} (an attention-pooling head?) has no attn_drop to tap")
    pooling = pooling_of(model)
    if pooling not in ("token", "avg", "avgmax", "max"):
        raise _unsupported(model, f"global_pool={pooling!r} (the output must be one vector per image)")
    if len(attentions) != len(blocks):
        raise _unsupported(
            model,
            f"found {len(attentions)} tappable attention modules for {len(blocks)} blocks "
            "(an attention-pooling head or an attention timm cannot run unfused)",
        )
    num_heads = int(attentions[0].num_heads)
    num_outputs = int(getattr(model, "num_classes", 0) or 0)
    output_kind = "logits"
    if num_outputs == 0:
        num_outputs, output_kind = int(model.num_features), "features"

    data = resolve_model_data_config(model)
    height, width = (int(v) for v in patch_embed.img_size)
    preprocess = PreprocessConfig(
        input_size=(3, height, width),
        interpolation=str(data.get("interpolation") or "bicubic"),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crop_pct=float(data.get("crop_pct") or 0.875),
        crop_mode=str(data.get("crop_mode") or "center"),
    )
    return ModelMetadata(
        source_model=spec.name,
        weights=spec.weights_label,
        weights_sha256=weights_sha256(model),
        preprocess=preprocess,
        patch_size=tuple(int(v) for v in patch_embed.patch_size),
        grid_size=tuple(int(v) for v in patch_embed.grid_size),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)),
        has_class_token=reads_class_token(model),
        pooling=pooling,
        num_layers=len(blocks),
        num_heads=num_heads,
        num_outputs=num_outputs,
        output_kind=output_kind,
        opset=opset,
        package_version=__version__,
        class_names=class_names_for(model, num_outputs, class_names_file) if output_kind == "logits" else (),
    )


def model_shape(model: nn.Module, metadata: ModelMetadata) -> ModelShape:
    """The sizes the export's memory depends on, read from the built model."""
    tokens = metadata.grid_size[0] * metadata.grid_size[1] + metadata.num_prefix_tokens
    width = int(getattr(model, "embed_dim", 0) or model.num_features)
    tensors = list(model.parameters()) + list(model.buffers())
    parameter_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return ModelShape(metadata.num_layers, metadata.num_heads, tokens, width, parameter_bytes)


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
        if estimate_export_bytes(replace(shape, tokens=tokens)) <= available:
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
    log: Callable[[str], None] = lambda message: None,
    model: nn.Module | None = None,
) -> ExportResult:
    """Build, trace, convert, check against eager PyTorch, then save; nothing is written on failure.

    ``model`` skips building from ``spec`` (tests export small, hand-made models this way);
    ``spec`` then only names it in the metadata. An export that would not fit in memory is
    refused before tracing.
    """
    if model is None:
        log(f"loading {spec.name} ({spec.weights_label})")
        model = build_model(spec)
    model = model.eval()
    metadata = describe_model(model, spec, class_names_file, opset)
    shape = model_shape(model, metadata)
    _refuse_when_too_big(spec, metadata, shape, output, class_names_file, opset)
    notice = _cropped_notice(metadata)
    if notice:
        log(notice)
    proto = _trace_and_convert(model, metadata, opset, log)

    log("checking the graph against the eager model")
    parity = check_parity(proto, model, metadata.preprocess.input_size, metadata.num_outputs, check_batch_size(shape))
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError("models over 2 GB (ONNX protobuf limit) are not supported yet")
    data = proto.SerializeToString()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, data)
    log(f"saved {output} ({len(data) / 1e6:.1f} MB); parity: {parity.summary()}")
    return ExportResult(output, metadata, parity, len(data))


def _trace_and_convert(model: nn.Module, metadata: ModelMetadata, opset: int, log: Callable[[str], None]) -> onnx.ModelProto:
    """The checked-to-be ONNX proto, with every tracing and conversion object freed on return:
    torch.export and the ONNX exporter leave reference cycles that would otherwise hold their
    graphs and copies through the parity check, the export's peak."""
    example = torch.randn(2, *metadata.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    log("tracing forward + attention gradients")
    graph = trace_explain_graph(model, example, metadata.num_outputs)
    log(f"converting to ONNX (opset {opset})")
    proto = make_gradients_optional(export_onnx(graph, example, metadata.num_outputs, opset))
    del graph
    gc.collect()
    proto.producer_name = "vit-explain"
    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata.to_json()})
    return proto
