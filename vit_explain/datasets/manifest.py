"""The inputs of a dataset run: a manifest (a text, CSV or Parquet list of image paths) or the
command's own files, folders and URIs, as one sorted list without duplicates.

Each input keeps the path as the user gave it (the ``path`` column of every row), where to read
it (relative manifest entries are relative to the manifest's own folder, so a manifest travels
with its images), and a relative name for its overlay files (unique, as discovery makes them).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..discovery import discover_images
from ..errors import VitExplainError, one_line
from ..outputs.naming import stem_rel
from .sources import is_uri, list_uri, require

__all__ = ["DatasetItem", "ManifestError", "collect_inputs", "read_manifest"]


class ManifestError(VitExplainError):
    """A manifest that cannot be read, or that names no image."""


@dataclass(frozen=True)
class DatasetItem:
    """One input image: ``path`` as given (the rows' ``path``), ``location`` to read it from,
    ``rel`` the relative name its overlays are written under."""

    path: str
    location: str
    rel: PurePosixPath


def _text_paths(manifest: Path) -> list[str]:
    """One path a line; blank lines and ``#`` comments are ignored."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _csv_paths(manifest: Path) -> list[str]:
    """The ``path`` column of a CSV with a header naming one; otherwise the first column of every row."""
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().casefold() for cell in rows[0]]
    if "path" in header:
        column = header.index("path")
        return [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]
    return [row[0].strip() for row in rows if row[0].strip()]


def _parquet_paths(manifest: Path) -> list[str]:
    """The ``path`` column of a Parquet file, or its only string column."""
    pq = require("pyarrow.parquet", "parquet", "a Parquet manifest")
    pa = require("pyarrow", "parquet", "a Parquet manifest")
    schema = pq.read_schema(manifest)
    strings = [field.name for field in schema if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)]
    column = "path" if "path" in schema.names else (strings[0] if len(strings) == 1 else None)
    if column is None:
        raise ManifestError(f"{manifest}: no 'path' column (columns: {', '.join(schema.names)})")
    return [value for value in pq.read_table(manifest, columns=[column]).column(column).to_pylist() if value]


def read_manifest(manifest: str | Path) -> list[DatasetItem]:
    """The images a manifest lists (``.parquet``/``.pq``, ``.csv``, anything else one path a line)."""
    manifest = Path(manifest)
    suffix = manifest.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            paths = _parquet_paths(manifest)
        elif suffix == ".csv":
            paths = _csv_paths(manifest)
        else:
            paths = _text_paths(manifest)
    except VitExplainError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"cannot read manifest {manifest}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"cannot read manifest {manifest}: {getattr(exc, 'strerror', None) or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors on a file that is not Parquet
        raise ManifestError(f"cannot read manifest {manifest}: {one_line(exc, 200)}") from None
    if not paths:
        raise ManifestError(f"manifest {manifest} lists no images")
    base = manifest.parent
    return [DatasetItem(p, p if is_uri(p) or Path(p).is_absolute() else str(base / p), _rel_of(p)) for p in paths]


def _rel_of(path: str) -> PurePosixPath:
    """A relative name for a path or URI (``s3://b/x.jpg`` -> ``s3/b/x.jpg``); naming cleans the rest."""
    return PurePosixPath(path.replace("://", "/", 1).lstrip("/") or "image")


def collect_inputs(inputs: Sequence[str], manifest: str | Path | None, exclude: Iterable[Path] = ()
                   ) -> tuple[list[DatasetItem], list[tuple[str, str]]]:
    """Inputs from the command line (files, folders, globs as the files path finds them, and URIs)
    and the manifest, sorted by path as given, each location once. Returns ``(items, problems)``."""
    local = [item for item in inputs if not is_uri(item)]
    found, problems = discover_images(local, exclude=exclude) if local else ([], [])
    items = [DatasetItem(str(image.path), str(image.path), image.rel) for image in found]
    for uri in (item for item in inputs if is_uri(item)):
        listed = list_uri(uri)
        if not listed:
            problems.append((uri, "no images found at this URI"))
        items += [DatasetItem(u, u, _rel_of(u)) for u in listed]
    if manifest is not None:
        items += read_manifest(manifest)
    return _unique(sorted(items, key=lambda item: item.path)), problems


def _unique(items: list[DatasetItem]) -> list[DatasetItem]:
    """Each location once (the first in sorted order), overlay names made unique as discovery does."""
    seen: set[str] = set()
    names: set[str] = set()
    result = []
    for item in items:
        if item.location in seen:
            continue
        seen.add(item.location)
        rel, n = item.rel, 1
        while (key := str(stem_rel(rel)).casefold()) in names:
            n += 1
            rel = item.rel.with_name(f"{item.rel.stem}-{n}{item.rel.suffix}")
        names.add(key)
        result.append(DatasetItem(item.path, item.location, rel))
    return result
