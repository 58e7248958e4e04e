"""``vit-explain explain --output-format parquet``: a dataset in, Parquet shards out.

The explain command's checks and settings are the files path's; only the inputs (a manifest and
URIs too) and the writer differ: a shard plan (:mod:`vit_explain.datasets`) run by the local
engine or by Ray Data, the complete shards of an earlier run with the same settings skipped.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click

from ..errors import VitExplainError
from .common import LINES, fail, logger

#: Images per shard when --shard-size is not given: ~1 MB of rows for a 14x14 grid.
DEFAULT_SHARD_SIZE = 1000


def check_dataset_flags(output_format: str, engine: str, overlays: bool, shard_size, actors, ray_address,
                        report: bool, formats) -> None:
    """Usage errors for flags that do not go together, before any model is opened; the optional
    libraries the run needs are imported here, so a missing one is one line now."""
    if output_format == "files":
        given = [name for name, value in (("--engine ray", engine == "ray"), ("--overlays", overlays),
                 ("--shard-size", shard_size is not None), ("--actors", actors is not None),
                 ("--ray-address", ray_address is not None)) if value]
        if given:
            raise click.BadParameter(f"{given[0]} goes with --output-format parquet", param_hint="--output-format")
        return
    if report or formats:
        flag = "--report" if report else "--format"
        raise click.BadParameter(f"{flag} goes with --output-format files (Parquet rows hold the masks; "
                                 "--overlays writes overlay PNGs)", param_hint=flag)
    if engine == "local" and (actors is not None or ray_address is not None):
        raise click.BadParameter("--actors and --ray-address go with --engine ray", param_hint="--engine")
    from ..datasets.sources import require

    try:
        require("pyarrow.parquet", "parquet", "--output-format parquet")
        if engine == "ray":
            require("ray.data", "ray", "--engine ray")
    except VitExplainError as exc:
        raise fail(exc) from None


def gather_inputs(inputs, manifest, output_dir: Path, output_format: str):
    """``(items, problems)``: :class:`DatasetItem` for Parquet, the files path's ``InputImage`` otherwise."""
    from ..datasets.manifest import collect_inputs, read_manifest
    from ..datasets.sources import is_uri
    from ..discovery import InputImage, discover_images

    try:
        if output_format == "parquet":
            return collect_inputs(list(inputs), manifest, exclude=[output_dir])
        items, problems = discover_images(list(inputs), exclude=[output_dir]) if inputs else ([], [])
        listed = read_manifest(manifest) if manifest is not None else []
    except VitExplainError as exc:
        raise fail(exc) from None
    problems += [(entry.path, "a URI needs --output-format parquet") for entry in listed if is_uri(entry.path)]
    items += [InputImage(Path(entry.location), entry.rel) for entry in listed if not is_uri(entry.path)]
    return items, problems


def run_dataset(explainer, items, problems, output_dir: Path, settings, *, shard_size, overlays: bool, engine: str,
                ray_address, actors, batch_size: int, threads, device: str, quiet: bool) -> None:
    """Plan, skip the complete shards, run the rest, and say done / skipped / failed in one line."""
    from ..datasets.local_engine import run_local
    from ..datasets.run import split_plan
    from ..datasets.shards import plan_shards, run_stamp
    from .explain import _Interrupted

    shards = plan_shards(items, shard_size or DEFAULT_SHARD_SIZE, run_stamp(settings, overlays))
    try:
        todo, skipped = split_plan(output_dir, shards, settings.overwrite)
    except VitExplainError as exc:
        raise fail(exc) from None
    counts = {"done": 0, "skipped": sum(result.skipped for result in skipped), "failed": 0}
    if counts["skipped"]:
        failed_before = sum(result.failed_before for result in skipped)
        logger.info("%d images in %d complete shard(s) already done with the same settings%s; --overwrite redoes them",
                    counts["skipped"], len(skipped), f" ({failed_before} failed: their rows say why)" if failed_before else "")
    progress = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=sum(len(s.items) for s in todo), unit="img", file=sys.stderr, dynamic_ncols=True)
    LINES.bar = progress
    started = time.perf_counter()
    if engine == "ray":
        from ..datasets.ray_engine import run_ray

        running = run_ray(explainer.session.path, todo, output_dir, settings, overlays, batch_size, actors or 1, device,
                          threads or 1, ray_address)
    else:
        running = run_local(explainer, todo, output_dir, settings, overlays, batch_size)
    try:
        with contextlib.closing(running):
            for result in running:
                counts["done"] += result.done
                counts["failed"] += result.failed
                for error in result.errors:
                    logger.warning("failed: %s", error)
                if progress is not None:
                    progress.update(len(result.shard.items))
    except KeyboardInterrupt:
        raise _Interrupted(f"{counts['done']} done in complete shards; a rerun skips them and goes on") from None
    except VitExplainError as exc:
        raise fail(exc) from None
    finally:
        LINES.bar = None
        if progress is not None:
            progress.close()
    elapsed = time.perf_counter() - started
    rate = counts["done"] / elapsed if elapsed > 0 and counts["done"] else 0.0
    failed = counts["failed"] + len(problems)
    click.echo(f"{counts['done']} done, {counts['skipped']} skipped, {failed} failed ({rate:.1f} img/s) -> {output_dir} "
               f"({len(shards)} shards, {len(skipped)} complete before)", err=True)
    if failed:
        sys.exit(1)
