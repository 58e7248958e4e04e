"""Export a timm Vision Transformer to a vit-explain ONNX model (needs torch + timm: the ``export`` extra)."""

from .exporter import ExportResult, default_output_path, describe_model, export_model
from ..metadata import parse_img_size
from .loading import ModelSpec, build_model

__all__ = [
    "ExportResult",
    "ModelSpec",
    "build_model",
    "default_output_path",
    "describe_model",
    "export_model",
    "parse_img_size",
]
