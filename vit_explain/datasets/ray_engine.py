"""The Ray engine: Ray Data reads the inputs and a pool of actors runs the torch-free Explainer.

The dataset is the pending shards' inputs (one row each: shard, position, path). A first
``map_batches`` reads each file's bytes (pyarrow's filesystems: local paths and object-store URIs;
Ray fuses it into the actors' stage, so each actor reads its own batches), then ``map_batches``
with an :class:`~ray.data.ActorPoolStrategy` hands batches to ``actors``
explainers (one GPU each with ``device="cuda"``), which decode and explain with the very code of
the local engine (:func:`.rows.explain_items`). The driver gathers the rows per shard and writes
each shard, as the local engine does, once all its images are back. Ray is the ``[ray]`` extra.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from ..errors import ImageError
from ..pipeline import ExplainSettings
from .local_engine import shard_result
from .manifest import DatasetItem
from .rows import explain_items, rows_table
from .shards import Shard, ShardResult, write_shard
from .sources import is_uri, read_bytes, require

__all__ = ["run_ray", "start_ray"]

logger = logging.getLogger(__name__)

#: Logical CPUs of a local Ray instance at least: fewer can deadlock Ray Data's stages.
MIN_LOCAL_CPUS = 4


def start_ray(address: str | None) -> tuple[bool, float]:
    """Connect to ``address`` (``auto``: the running cluster) or start a local Ray; returns
    ``(started here, seconds it took)``. A Ray already initialised in this process is used as is."""
    ray = require("ray", "ray", "--engine ray")
    if ray.is_initialized():
        return False, 0.0
    began = time.perf_counter()
    local = {} if address else {"num_cpus": max(MIN_LOCAL_CPUS, os.cpu_count() or 1)}
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, **local)
    return True, time.perf_counter() - began


def _quiet_ray_data(ray) -> None:
    """Ray Data's progress bars and per-run INFO lines off: the command prints its own lines."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _read_batch(batch):
    """Ray Data's read stage: each input's bytes, or why it could not be read (one line)."""
    pa = require("pyarrow", "parquet", "--engine ray")
    data, errors = [], []
    for location, absolute in zip(batch.column("location").to_pylist(), batch.column("absolute").to_pylist(), strict=True):
        try:
            data.append(read_bytes(absolute, label=location))
            errors.append(None)
        except ImageError as exc:
            data.append(None)
            errors.append(str(exc))
    return batch.append_column("data", pa.array(data, pa.binary())).append_column("read_error", pa.array(errors, pa.string()))


class _ExplainActor:
    """One Explainer per actor, kept for the whole run; each batch -> its rows, tagged with
    shard and position so the driver can put every shard together."""

    def __init__(self, model_path: str, device: str, threads: int, settings: ExplainSettings, overlay_dir: str | None):
        from ..runtime import Explainer

        self.explainer = Explainer(model_path, device=device, threads=threads)
        self.settings = settings
        self.overlay_dir = None if overlay_dir is None else Path(overlay_dir)

    def __call__(self, batch):
        from ..runtime.images import load_image_bytes

        pa = require("pyarrow", "parquet", "--engine ray")
        columns = {name: batch.column(name).to_pylist() for name in ("shard", "position", "path", "location", "rel", "data",
                                                                      "read_error")}
        items = [DatasetItem(p, loc, PurePosixPath(rel)) for p, loc, rel in zip(columns["path"], columns["location"],
                                                                                  columns["rel"], strict=True)]
        decoded = []
        for item, data, error in zip(items, columns["data"], columns["read_error"], strict=True):
            try:
                decoded.append(ImageError(error) if error is not None else load_image_bytes(data, item.location))
            except ImageError as exc:
                decoded.append(exc)
        per_item = explain_items(self.explainer, items, decoded, self.settings, self.overlay_dir)
        rows = [row for item_rows in per_item for row in item_rows]
        table = rows_table(rows)
        counts = [len(item_rows) for item_rows in per_item]
        repeat = lambda values: [v for v, n in zip(values, counts, strict=True) for _ in range(n)]  # noqa: E731
        return table.append_column("shard", pa.array(repeat(columns["shard"]), pa.int64())).append_column(
            "position", pa.array(repeat(columns["position"]), pa.int64()))


def run_ray(model_path: str | Path, shards: Sequence[Shard], output_dir: Path, settings: ExplainSettings,
            overlays: bool, batch_size: int = 8, actors: int = 1, device: str = "cpu", threads: int = 1,
            address: str | None = None) -> Iterator[ShardResult]:
    """Explain ``shards`` on Ray (started here unless already running) and write each shard on
    this machine as soon as all its rows are back; yields the shards' results as they complete.
    ``device`` is each actor's (``cuda``: one GPU reserved per actor; ``auto``: whatever the
    actor's machine has), ``threads`` each actor's thread count (and the CPUs it reserves)."""
    if not shards:
        return
    ray = require("ray", "ray", "--engine ray")
    pa = require("pyarrow", "parquet", "--engine ray")
    started, seconds = start_ray(address)
    if started:
        logger.info("Ray started in %.1f s", seconds)
    try:
        records = [(s.index, i, item) for s in shards for i, item in enumerate(s.items)]
        table = pa.table({
            "shard": pa.array([r[0] for r in records], pa.int64()),
            "position": pa.array([r[1] for r in records], pa.int64()),
            "path": [r[2].path for r in records],
            "location": [r[2].location for r in records],
            # actors may run in another folder (or machine): local paths travel absolute
            "absolute": [r[2].location if is_uri(r[2].location) else os.path.abspath(r[2].location) for r in records],
            "rel": [str(r[2].rel) for r in records],
        })
        _quiet_ray_data(ray)
        # Blocks are what Ray Data hands out and hands back: enough that every actor gets work, and
        # none larger than a shard, so shards are written (and a killed run keeps them) as they finish.
        largest = max(len(s.items) for s in shards)
        rows = max(1, min(largest, -(-table.num_rows // (2 * actors))))
        blocks = [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
        dataset = ray.data.from_arrow(blocks).map_batches(_read_batch, batch_format="pyarrow", batch_size=batch_size)
        dataset = dataset.map_batches(
            _ExplainActor, batch_format="pyarrow", batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, num_gpus=1 if device == "cuda" else 0,
            fn_constructor_kwargs={
                "model_path": str(Path(model_path).absolute()), "device": device, "threads": threads, "settings": settings,
                "overlay_dir": str(output_dir.absolute()) if overlays else None,
            },
        )
        yield from _gather(dataset, {s.index: s for s in shards}, output_dir)
    finally:
        if started:
            ray.shutdown()


def _gather(dataset, shards: dict[int, Shard], output_dir: Path) -> Iterator[ShardResult]:
    """Rows back from the actors, per shard; a shard is written once every image of it is back."""
    rows: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    positions: dict[int, set[int]] = defaultdict(set)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        touched = set()
        for row in batch.to_pylist():
            index, position = row.pop("shard"), row.pop("position")
            rows[index].append((position, row))
            positions[index].add(position)
            touched.add(index)
        for index in sorted(touched):
            shard = shards[index]
            if len(positions[index]) == len(shard.items):
                ordered = [row for _, row in sorted(rows.pop(index), key=lambda pair: pair[0])]  # stable: maps keep order
                del positions[index]
                write_shard(output_dir, shard, ordered)
                yield shard_result(shard, ordered)
