"""Resolve ``--model``: an exported file, or a timm model name exported once into the user's cache.

The cache directory is platformdirs' user cache for ``vit-explain`` (``~/.cache/vit-explain``
on Linux), overridable with the ``VIT_EXPLAIN_CACHE`` environment variable. Exporting needs
torch and timm (the ``export`` extra); the runtime alone can only use existing files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import ExportError, ModelFileError

__all__ = ["DEFAULT_MODEL", "CACHE_ENV", "cache_dir", "cached_model_path", "resolve_model"]

#: As in the original tool, a DeiT-tiny explains when no model is named.
DEFAULT_MODEL = "deit_tiny_patch16_224"
CACHE_ENV = "VIT_EXPLAIN_CACHE"


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vit-explain"))


def cached_model_path(name: str) -> Path:
    return cache_dir() / f"{name}.onnx"


def _looks_like_file(model: str) -> bool:
    return model.endswith(".onnx") or os.sep in model or "/" in model or Path(model).exists()


def resolve_model(model: str, notify: Callable[[str], None] = lambda message: None) -> Path:
    """The path of the exported model for ``model`` (a file path or a timm model name)."""
    if _looks_like_file(model):
        path = Path(model)
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        return path
    path = cached_model_path(model)
    if path.is_file():
        return path
    try:
        from .export import ModelSpec, export_model
    except ImportError as exc:
        raise ExportError(
            f"{model!r} is not exported yet and exporting needs PyTorch and timm ({exc.name} is missing): "
            'install them with pip install -e ".[export]", or pass an exported .onnx file'
        ) from None
    notify(f"exporting {model} to {path} (once; later runs reuse it)")
    try:
        export_model(ModelSpec(model, weights="pretrained"), path)
    except ExportError as exc:
        raise ExportError(
            f"{exc}. To use local weights: vit-explain export {model} --weights PATH, then --model <that file>"
        ) from None
    return path
