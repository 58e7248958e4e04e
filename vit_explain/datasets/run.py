"""A dataset run, whichever engine: the plan, the shards already complete, the stale ones.

The rerun rule is the files path's: a shard complete with the same stamp (model and settings
included) is skipped; any other is redone. Shard files beyond this run's plan (left by another
input list or ``--shard-size``) would mix with this run's when the folder is read as one dataset,
so they are refused, or removed with ``overwrite``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import OutputError
from .shards import Shard, ShardResult, failed_rows, is_complete, stale_shards

__all__ = ["split_plan"]


def split_plan(output_dir: Path, shards: Sequence[Shard], overwrite: bool) -> tuple[list[Shard], list[ShardResult]]:
    """``(to do, skipped)``: the shards to (re)write, and a result for each complete one."""
    stale = stale_shards(output_dir, len(shards))
    if stale and not overwrite:
        raise OutputError(
            f"{output_dir} holds {stale[0].name}{' and others' if len(stale) > 1 else ''} beyond this run's "
            f"{len(shards)} shard(s) (another input list or --shard-size): use another output folder, "
            "or --overwrite to replace them"
        )
    for path in stale:
        path.unlink(missing_ok=True)
    todo, skipped = [], []
    for shard in shards:
        if not overwrite and is_complete(output_dir, shard):
            skipped.append(ShardResult(shard, skipped=len(shard.items), failed_before=failed_rows(output_dir / shard.name)))
        else:
            todo.append(shard)
    return todo, skipped


def results_in_order(skipped: Sequence[ShardResult], running: Iterator[ShardResult]) -> Iterator[ShardResult]:
    """The skipped shards first (as the files path yields its skipped images first), then the run's."""
    yield from skipped
    yield from running
