"""``export``: timm model -> checked, self-describing ONNX file, written once and atomically."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    ``spec`` then only names it in the metadata.
    """
    if model is None:
        log(f"loading {spec.name} ({spec.weights_label})")
        model = build_model(spec)
    model = model.eval()
    metadata = describe_model(model, spec, class_names_file, opset)
    example = torch.randn(2, *metadata.preprocess.input_size, generator=torch.Generator().manual_seed(0))

    log("tracing forward + attention gradients")
    graph = trace_explain_graph(model, example, metadata.num_outputs)
    log(f"converting to ONNX (opset {opset})")
    proto = make_gradients_optional(export_onnx(graph, example, metadata.num_outputs, opset))
    proto.producer_name = "vit-explain"
    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata.to_json()})

    log("checking the graph against the eager model")
    parity = check_parity(proto, model, metadata.preprocess.input_size, metadata.num_outputs)
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError("models over 2 GB (ONNX protobuf limit) are not supported yet")
    data = proto.SerializeToString()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, data)
    log(f"saved {output} ({len(data) / 1e6:.1f} MB); parity: {parity.summary()}")
    return ExportResult(output, metadata, parity, len(data))
