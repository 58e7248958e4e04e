"""Resolve ``--model``: an exported file, or a timm model name exported once into the user's cache.

The cache directory is platformdirs' user cache for ``vit-explain`` (``~/.cache/vit-explain``
on Linux), overridable with the ``VIT_EXPLAIN_CACHE`` environment variable. Exporting needs
torch and timm (the ``export`` extra); the runtime alone can only use existing files.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from .errors import ExportError, ModelFileError, WeightsUnavailableError

__all__ = ["DEFAULT_MODEL", "CACHE_ENV", "cache_dir", "cached_model_path", "check_not_checkpoint", "resolve_model"]

logger = logging.getLogger(__name__)

#: File name endings of PyTorch weights (what people download beside a model card).
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

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
    return (
        model.endswith((".onnx", *CHECKPOINT_SUFFIXES)) or os.sep in model or "/" in model or Path(model).exists()
    )


def _is_checkpoint(path: Path) -> bool:
    """By name, or by content: a safetensors header (8-byte length, then JSON), a zip (what
    ``torch.save`` writes) or a pickle. An ONNX file is a protobuf and starts otherwise."""
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(10)
    except OSError:
        return False
    return head[8:10] == b'{"' or head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def check_not_checkpoint(path: Path) -> None:
    """Refuse a PyTorch checkpoint given where an exported model belongs, with the command that
    exports it: onnxruntime would otherwise only say "Wire format was corrupt"."""
    if _is_checkpoint(path):
        onnx_path = shlex.quote(str(path.with_suffix(".onnx")))
        raise ModelFileError(
            f"{path} is a PyTorch checkpoint, not an exported model; export it first: "
            f"vit-explain export MODEL_NAME --weights {shlex.quote(str(path))} -o {onnx_path} "
            f"(MODEL_NAME: its timm architecture), then use --model {onnx_path}"
        )


def resolve_model(model: str) -> Path:
    """The path of the exported model for ``model`` (a file path or a timm model name).

    A name not exported yet is exported once into the cache, said on one INFO line of the
    ``vit_explain.model_store`` logger: it can take minutes, and must not look like a hang."""
    if _looks_like_file(model):
        path = Path(model)
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        check_not_checkpoint(path)
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
    logger.info("exporting %s to %s (once; later runs reuse it)", model, path)
    try:
        export_model(ModelSpec(model, weights="pretrained"), path)
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(_offline_message(model, exc)) from None
    return path


def _offline_message(model: str, exc: WeightsUnavailableError) -> str:
    """One instruction that runs as written (PATH: the user's checkpoint): ``explain`` has no
    ``--weights``, so the route is export with local weights, then ``--model`` that file."""
    cause = type(exc.__context__).__name__ if exc.__context__ is not None else "offline?"
    onnx_path = shlex.quote(f"{model}.onnx")
    return (
        f"{model} is not exported yet and its pretrained weights cannot be downloaded ({cause}). "
        f"With a local checkpoint: vit-explain export {model} --weights PATH -o {onnx_path}, "
        f"then use --model {onnx_path}"
    )
