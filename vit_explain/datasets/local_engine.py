"""The local engine: this process's Explainer runs the shards one after the other.

Decoding goes to a thread pool as wide as the explainer's (Pillow releases the GIL), then one
explain step per batch (:func:`.rows.explain_items`); a shard is written once all its rows are
there. Closing the generator (Ctrl-C) drops the shard in progress: a rerun redoes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..pipeline import ExplainSettings
from .rows import explain_items
from .shards import Shard, ShardResult, write_shard
from .sources import read_image

__all__ = ["run_local", "shard_result"]


def shard_result(shard: Shard, rows: Sequence[dict]) -> ShardResult:
    """Counts per image (not per row): an image failed when its row carries an error."""
    failed = {row["path"]: row["error"] for row in rows if row["error"] is not None}
    return ShardResult(shard, done=len(shard.items) - len(failed), failed=len(failed), errors=tuple(failed.values()))


def run_local(explainer, shards: Sequence[Shard], output_dir: Path, settings: ExplainSettings, overlays: bool,
              batch_size: int = 8) -> Iterator[ShardResult]:
    """Explain and write ``shards`` in order, yielding each one's result once its file is renamed."""
    pool = ThreadPoolExecutor(max(1, explainer.workers), thread_name_prefix="vit-explain-read")
    try:
        for shard in shards:
            rows: list[dict] = []
            for start in range(0, len(shard.items), batch_size):
                batch = shard.items[start : start + batch_size]
                decoded = list(pool.map(read_image, [item.location for item in batch]))
                for item_rows in explain_items(explainer, batch, decoded, settings, output_dir if overlays else None):
                    rows += item_rows
            write_shard(output_dir, shard, rows)
            yield shard_result(shard, rows)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
