"""Exceptions with messages meant for users: the CLI prints them as one line."""

from __future__ import annotations

__all__ = [
    "first_line", "one_line", "VitExplainError", "ModelFileError", "DeviceError", "ImageError", "OutputError",
    "ExportError", "WeightsUnavailableError", "ParityError",
]


class VitExplainError(Exception):
    """Base class: anything vit-explain reports to a user without a traceback."""


class ModelFileError(VitExplainError):
    """The file is not a usable vit-explain model (missing, truncated, foreign ONNX, newer format,
    metadata that contradicts its own graph, weights stored outside its folder)."""


class DeviceError(VitExplainError):
    """The requested device is not available (for example CUDA without onnxruntime-gpu or a GPU)."""


class ImageError(VitExplainError):
    """An input image cannot be read or is refused (not an image, truncated, decompression bomb)."""


class OutputError(VitExplainError):
    """An output folder or file cannot be written (read-only folder, a file in the way, disk full)."""


class ExportError(VitExplainError):
    """A timm model cannot be exported (unsupported architecture, weights not available, bad checkpoint)."""


class WeightsUnavailableError(ExportError):
    """Pretrained weights cannot be fetched (offline, hub down): callers suggest local weights."""


class ParityError(ExportError):
    """The exported graph disagrees with the eager PyTorch model beyond tolerance: nothing is saved."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """The whole reason an exception gives, its whitespace squeezed onto one line (its type when
    empty), cut at ``limit`` characters when given: Pillow's and pyarrow's messages are short but
    may hold newlines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None else text[:limit]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when empty): third-party errors
    (onnxruntime, protobuf, the hub client) can span pages, a user needs the gist."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
