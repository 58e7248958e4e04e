"""The shard plan: sorted inputs cut into shards of ``shard_size`` images, named by index, each
written to a temporary name and renamed when complete.

A shard file carries its stamp in the Parquet footer (key ``vit_explain``): the recorded settings
(the files path's :meth:`~vit_explain.pipeline.ExplainSettings.recorded`, the model's weights hash
among them), the categories, whether overlays were written, and which inputs it holds. A rerun
skips a shard whose stamp equals the one it would write, and redoes any other, as the files path
redoes an image explained with another model or setting. So a killed run (either engine) resumes
at the first incomplete shard and never writes an image twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_writer
from ..errors import OutputError
from ..pipeline import ExplainSettings
from .manifest import DatasetItem
from .rows import rows_table
from .sources import require

__all__ = ["Shard", "ShardResult", "STAMP_KEY", "plan_shards", "read_stamp", "run_stamp", "stale_shards", "write_shard"]

STAMP_KEY = b"vit_explain"
_NAME = re.compile(r"shard-(\d{5,})\.parquet")


@dataclass(frozen=True)
class Shard:
    """Images ``index * shard_size ...`` of the sorted inputs, and the stamp its file must carry."""

    index: int
    items: tuple[DatasetItem, ...]
    stamp: dict

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.parquet"


@dataclass(frozen=True)
class ShardResult:
    """What became of one shard's images: all skipped (the shard was complete), or done / failed."""

    shard: Shard
    done: int = 0
    failed: int = 0
    skipped: int = 0
    errors: tuple[str, ...] = ()
    failed_before: int = 0  # of the skipped images: those whose row (written by an earlier run) is an error


def run_stamp(settings: ExplainSettings, overlays: bool) -> dict:
    """What every shard of a run records besides its inputs: a rerun that differs redoes it."""
    return {
        "format": 1,
        "settings": settings.recorded(),
        "categories": list(settings.categories) if settings.categories else None,
        "default_target": settings.default_target,
        "overlays": bool(overlays),
    }


def plan_shards(items: Sequence[DatasetItem], shard_size: int, stamp: dict) -> list[Shard]:
    """The deterministic plan: ``items`` (already sorted) in consecutive shards of ``shard_size``."""
    shards = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        part = tuple(items[start : start + shard_size])
        digest = hashlib.sha256("\n".join(item.location for item in part).encode("utf-8")).hexdigest()
        shards.append(Shard(index, part, {**stamp, "shard": index, "shard_size": shard_size,
                                          "images": len(part), "inputs_sha256": digest}))
    return shards


def read_stamp(path: Path) -> dict | None:
    """The stamp in a shard's footer, or None (missing, truncated, not ours)."""
    pq = require("pyarrow.parquet", "parquet", "--output-format parquet")
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[STAMP_KEY])
    except Exception:  # noqa: BLE001 - anything unreadable is simply not complete
        return None


def is_complete(output_dir: Path, shard: Shard) -> bool:
    return read_stamp(output_dir / shard.name) == shard.stamp


def failed_rows(path: Path) -> int:
    """Images a complete shard records as failed (its ``error`` column alone is read)."""
    pq = require("pyarrow.parquet", "parquet", "--output-format parquet")
    return len(set(pq.read_table(path, columns=["path", "error"]).filter(_has_error()).column("path").to_pylist()))


def _has_error():
    compute = require("pyarrow.compute", "parquet", "--output-format parquet")
    return compute.is_valid(compute.field("error"))


def stale_shards(output_dir: Path, count: int) -> list[Path]:
    """Shard files beyond this plan's ``count`` (another input list or shard size wrote them)."""
    if not output_dir.is_dir():
        return []
    found = (( _NAME.fullmatch(p.name), p) for p in output_dir.iterdir())
    return sorted(p for match, p in found if match and int(match.group(1)) >= count)


def write_shard(output_dir: Path, shard: Shard, rows: Sequence[dict]) -> None:
    """The shard's rows, stamped, written to a hidden temporary name and renamed when complete."""
    pq = require("pyarrow.parquet", "parquet", "--output-format parquet")
    table = rows_table(rows, {STAMP_KEY: json.dumps(shard.stamp, sort_keys=True).encode("utf-8")})
    try:
        with atomic_writer(output_dir / shard.name, "wb") as handle:
            pq.write_table(table, handle)
    except OSError as exc:
        raise OutputError(f"cannot write {output_dir / shard.name}: {exc.strerror or exc}") from None
