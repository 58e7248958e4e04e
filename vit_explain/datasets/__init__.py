"""Datasets: many images in, Parquet shards out, resumable, on one machine or a Ray cluster.

The route is the files path's (:mod:`vit_explain.pipeline`): decode -> ``Explainer.explain`` ->
masks; only the writer differs. ``manifest`` and ``sources`` find and read the inputs (local
paths, or any URI pyarrow's filesystems read), ``shards`` cuts them into a deterministic plan and
writes each shard atomically, ``rows`` is the one row schema, and the engines (``local_engine``,
``ray_engine``) run the plan. pyarrow (the ``[parquet]`` extra) and Ray (``[ray]``) are imported
only when used. Nothing here imports torch.
"""

from __future__ import annotations

from .manifest import DatasetItem, read_manifest
from .shards import Shard, ShardResult, plan_shards

__all__ = ["DatasetItem", "Shard", "ShardResult", "plan_shards", "read_manifest"]
