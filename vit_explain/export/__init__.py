"""Export a Vision Transformer (timm today, through :mod:`vit_explain.families`) to a vit-explain ONNX
model (needs torch + timm: the ``export`` extra)."""

from ..families import ModelSpec, build_model
from ..metadata import parse_img_size
from .exporter import ExportResult, default_output_path, describe_model, export_model

__all__ = [
    "ExportResult",
    "ModelSpec",
    "build_model",
    "default_output_path",
    "describe_model",
    "export_model",
    "parse_img_size",
]
