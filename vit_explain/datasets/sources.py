"""Reading dataset inputs: local files, or any URI pyarrow's filesystems read (``s3://``,
``gs://``, ``hdfs://``, ``file://``), so a dataset in an object store needs no copy first.

Decoding is :mod:`vit_explain.runtime.images`' own (the same checks and one-line errors as the
files path); this module only fetches bytes and lists folders. pyarrow and Ray are imported
lazily (:func:`require`): without them, one line naming the extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from PIL import Image

from ..discovery import PHOTO_SUFFIXES
from ..errors import ImageError, VitExplainError, one_line
from ..runtime.images import load_image, load_image_bytes

__all__ = ["MissingExtraError", "is_uri", "list_uri", "read_bytes", "read_image", "require"]


class MissingExtraError(VitExplainError):
    """An optional dependency (pyarrow, Ray) is needed for what was asked and is not installed."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or one line naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}: pip install 'vit-explain[{extra}]'"
        ) from None


def is_uri(path: str) -> bool:
    """``scheme://...``: read through pyarrow's filesystems rather than ``open``."""
    return "://" in path


def _filesystem(uri: str):
    fs = require("pyarrow.fs", "parquet", "reading images by URI")
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ImageError(f"cannot read image {uri}: {one_line(exc)}") from exc


def read_bytes(path: str, label: str | None = None) -> bytes:
    """The file's bytes (a local path or a URI); ImageError naming ``label`` (default ``path``)
    with the reason the files path gives when it cannot be read."""
    label = label or path
    if not is_uri(path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"cannot read image {label}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"cannot read image {label}: it is a directory") from None
        except PermissionError:
            raise ImageError(f"cannot read image {label}: permission denied") from None
        except OSError as exc:
            raise ImageError(f"cannot read image {label}: {one_line(exc)}") from None
    filesystem, inner = _filesystem(path)
    try:
        with filesystem.open_input_file(inner) as handle:
            return handle.readall()
    except Exception as exc:  # noqa: BLE001 - one line whatever the store says
        raise ImageError(f"cannot read image {label}: {one_line(exc, 200)}") from exc


def read_image(path: str) -> Image.Image | ImageError:
    """The one decode of an input (for a worker pool: the error is returned, not raised).
    Local files go through :func:`load_image` exactly as the files path reads them."""
    try:
        return load_image(path) if not is_uri(path) else load_image_bytes(read_bytes(path), path)
    except ImageError as exc:
        return exc


def list_uri(uri: str) -> list[str]:
    """The photos under a URI folder (recursive, by :data:`PHOTO_SUFFIXES`), as URIs, sorted;
    a URI naming a file is itself."""
    fs = require("pyarrow.fs", "parquet", "reading images by URI")
    filesystem, inner = fs.FileSystem.from_uri(uri)
    scheme = uri[: uri.index("://") + 3]
    info = filesystem.get_file_info(inner)
    if info.type == fs.FileType.File:
        return [uri]
    if info.type != fs.FileType.Directory:
        return []
    found = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
    return sorted(
        scheme + entry.path for entry in found
        if entry.type == fs.FileType.File and Path(entry.path).suffix.lower() in PHOTO_SUFFIXES
        and not any(part.startswith(".") for part in Path(entry.path).parts)
    )
