"""Export a timm Vision Transformer to a vit-explain ONNX model (needs torch + timm: the ``export`` extra)."""

from .exporter import ExportResult, default_output_path, describe_model, export_model
from .loading import ModelSpec, build_model, parse_img_size

__all__ = [
    "ExportResult",
    "ModelSpec",
    "build_model",
    "default_output_path",
    "describe_model",
    "export_model",
    "parse_img_size",
]
