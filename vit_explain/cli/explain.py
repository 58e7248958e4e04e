"""``vit-explain explain``: images in, maps out (overlays, raw masks, JSON; a report on request).

Everything that needs no model is checked first (flags, inputs, the output folder), so a typo
never waits for a model download; Ctrl-C stops the workers and says what was done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click

from ..atomic import probe_writable
from ..errors import OutputError, VitExplainError
from ..methods import HEAD_FUSIONS, METHOD_NAMES  # the registry imports no numpy: --help stays fast
from .common import LINES, bad_settings, check_categories, device_option, fail, logger, open_explainer, set_quiet


@click.command()
@click.argument("inputs", nargs=-1)
@click.option("-m", "--model", default=None, metavar="FILE|NAME",
              help="An exported .onnx file, or a timm model name (exported once into the cache). [default: deit_tiny_patch16_224]")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vit-explain-out"), show_default=True,
              help="Folder for the maps (created; checked writable before any work).")
@click.option("--method", type=click.Choice(METHOD_NAMES), help="Default: rollout, or grad_rollout when --category-index is given.")
@click.option("--head-fusion", type=click.Choice(HEAD_FUSIONS), help="Default: max for rollout, mean for grad_rollout and attention.")
@click.option("--discard-ratio", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of the lowest attentions dropped per layer, in [0, 1). [default: 0.9]")
@click.option("--start-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip the first K layers (rollout, grad_rollout, gae).")
@click.option("--category-index", "category_index", type=click.IntRange(min=0), multiple=True,
              help="Class to explain (repeatable: one map per class). Implies grad_rollout.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images explained together (memory grows with it).")
@click.option("--format", "formats", type=click.Choice(["png", "npy", "json"]), multiple=True,
              help="Outputs to write (repeatable). [default: png, npy and json]")
@click.option("--colormap", default="jet", show_default=True, help="Any matplotlib colormap name.")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Weight of the heat map in the overlay.")
@click.option("--overwrite", is_flag=True, help="Redo images whose outputs exist (default: skip them, so a rerun resumes).")
@click.option("--report", is_flag=True, help="Also write report.html and contact_sheet.png in the output directory.")
@device_option
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [default: onnxruntime's choice].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-image messages.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="A text (one path a line), CSV ('path' column) or Parquet list of images; relative paths are the manifest folder's.")
@click.option("--output-format", type=click.Choice(["files", "parquet"]), default="files", show_default=True,
              help="files: overlay, mask and JSON per image; parquet: shards of one row per (image, map), resumable.")
@click.option("--shard-size", type=click.IntRange(min=1), help="Images per Parquet shard. [default: 1000]")
@click.option("--overlays", is_flag=True, help="With parquet: also write overlay PNGs (under _overlays/).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="With parquet: this process, or Ray Data (pip install 'vit-explain[ray]').")
@click.option("--ray-address", help="Ray cluster to join ('auto': the running one). [default: a local Ray]")
@click.option("--actors", type=click.IntRange(min=1), help="Ray actors, each with its own Explainer (one GPU each on CUDA). [default: 1]")
def explain(inputs, model, output_dir, method, head_fusion, discard_ratio, start_layer, category_index, batch_size,
            formats, colormap, alpha, overwrite, report, device, threads, quiet, manifest, output_format, shard_size,
            overlays, engine, ray_address, actors) -> None:
    """Explain images: files, folders (recursive), glob patterns, or a --manifest.

    In folders and patterns, files with a photo's extension or image content are taken; one that
    cannot be read is reported with the reason, and the others go on.

    Writes, per image and map, an overlay PNG at the image's size, the raw mask (.npy, patch grid)
    and one JSON with the top-5 predictions and the settings used; with --output-format parquet,
    Parquet shards instead (inputs may also be URIs pyarrow reads: s3://, gs://, file://).
    """
    from ..outputs import available_colormaps
    from ..pipeline import FORMATS, ExplainSettings
    from .explain_dataset import check_dataset_flags, gather_inputs, run_dataset

    if colormap not in available_colormaps():
        raise click.BadParameter(f"unknown colormap {colormap!r} (for example: jet, viridis, inferno, turbo)", param_hint="--colormap")
    set_quiet(quiet)
    with _interrupts_stop_cleanly():
        # Everything that needs no model first: a typo must not wait for a model download.
        chosen = _check_method_flags(method, head_fusion, discard_ratio, start_layer, category_index)
        check_dataset_flags(output_format, engine, overlays, shard_size, actors, ray_address, report, formats)
        if not inputs and manifest is None:
            raise click.UsageError("give images (files, folders, patterns) or --manifest FILE")
        items, problems = gather_inputs(inputs, manifest, output_dir, output_format)
        for source, reason in problems:
            logger.warning("skipping %s: %s", source, reason)
        if not items:
            raise fail(VitExplainError("no images to explain"))
        _check_output_dir_early(output_dir)
        # Ray's actors open the model themselves: the driver's copy is for its metadata and checks only.
        with open_explainer(model, *(("cpu", 1) if engine == "ray" else (device, threads))) as explainer:
            meta = explainer.metadata
            categories = check_categories(category_index, meta)
            resolved = _resolve_method(explainer, chosen, head_fusion, discard_ratio, start_layer, categories)
            settings = ExplainSettings(
                resolved.method, resolved.head_fusion, resolved.discard_ratio, categories,
                "top1" if meta.output_kind == "logits" else "features",
                tuple(formats) or FORMATS, colormap, alpha, overwrite, start_layer, meta.weights_sha256,
            )
            _check_output_dir(output_dir)
            if output_format == "parquet":
                run_dataset(explainer, items, problems, output_dir, settings, shard_size=shard_size, overlays=overlays,
                            engine=engine, ray_address=ray_address, actors=actors, batch_size=batch_size,
                            threads=threads, device=device, quiet=quiet)
                return
            _run_explain(explainer, items, output_dir, settings, batch_size, report, quiet, problems)

class _Interrupted(Exception):
    """Ctrl-C, once the work in flight has stopped: what was done is said on one line."""


def _stop_on_first_interrupt(signum, frame) -> None:
    """The first Ctrl-C raises KeyboardInterrupt; later ones are ignored until the process ends,
    so the cleanup (waiting for the worker threads' current graph calls) is never cut short: a
    process that exits while onnxruntime still runs on a worker can abort ("terminate called
    without an active exception", exit 134) instead of stopping cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_stop_cleanly() -> Iterator[None]:
    """Ctrl-C: workers stopped (the ``with`` blocks inside close them), one ``interrupted`` line,
    exit code 130 (128 + SIGINT, as shells report it)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _stop_on_first_interrupt) if main_thread else None
    try:
        yield
    except (KeyboardInterrupt, _Interrupted) as exc:
        detail = str(exc) if isinstance(exc, _Interrupted) else ""
        click.echo(f"interrupted{': ' + detail if detail else ''}", err=True)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _check_output_dir_early(output_dir: Path) -> None:
    """Before the model is resolved (perhaps a download): the nearest existing folder must be a
    folder this user may write in. Creates nothing, so a refused run leaves no trace."""
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise fail(OutputError(f"cannot write to {output_dir}: {existing} is not a folder"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail(OutputError(f"cannot write to {output_dir}: {existing} is not writable"))


def _check_output_dir(output_dir: Path) -> None:
    """Just before the work: create the folder and write (and remove) a small probe file, so a
    read-only, full or forbidden folder is one line now rather than a failure for every image."""
    try:
        probe_writable(output_dir)
    except OSError as exc:
        raise fail(OutputError(f"cannot write to {output_dir}: {exc.strerror or exc}")) from None

def _check_method_flags(method, head_fusion, discard_ratio, start_layer, categories) -> str:
    """The method, and a usage error for a flag it does not use (with the reason): the one
    ``resolve_settings``, applied before any model is opened (the layer count comes later)."""
    from ..methods import SettingsError, resolve_settings

    try:
        chosen = resolve_settings(
            method, head_fusion, discard_ratio, start_layer, has_category=bool(categories), refuse_category=True
        )
    except SettingsError as exc:
        raise bad_settings(exc) from None
    return chosen.method


def _resolve_method(explainer, chosen, head_fusion, discard_ratio, start_layer, categories):
    """Defaults per method, once the model is known (its layer count bounds --start-layer)."""
    from ..methods import SettingsError, resolve_settings

    try:
        return resolve_settings(
            chosen, head_fusion, discard_ratio, start_layer, has_category=bool(categories), refuse_category=True,
            num_layers=explainer.metadata.num_layers,
        )
    except SettingsError as exc:
        raise bad_settings(exc) from None


#: The most images a report shows (thumbnails of the first ones, kept while the files are written).
REPORT_ROWS = 1000


def _run_explain(explainer, items, output_dir: Path, settings, batch_size: int, report: bool, quiet: bool,
                 problems: list[tuple[str, str]]) -> None:
    from ..pipeline import explain_images

    counts = {"done": 0, "skipped": 0, "failed": 0}
    outcomes = []
    show_bar = not quiet and sys.stderr.isatty()
    started = time.perf_counter()
    progress = None
    if show_bar:
        from tqdm import tqdm

        progress = tqdm(total=len(items), unit="img", file=sys.stderr, dynamic_ncols=True)

    LINES.bar = progress
    running = explain_images(explainer, items, output_dir, settings, batch_size, previews=REPORT_ROWS if report else 0)
    try:
        with contextlib.closing(running):  # Ctrl-C: the generator's file pool is shut down here
            for outcome in running:
                counts[outcome.status] += 1
                outcomes.append(outcome)
                if outcome.status == "failed":
                    logger.warning("failed: %s", outcome.error)
                if progress is not None:
                    progress.update(1)
    except KeyboardInterrupt:
        raise _Interrupted(f"{counts['done']} done; a rerun skips them and goes on") from None
    finally:
        LINES.bar = None
        if progress is not None:
            progress.close()
    if counts["skipped"]:
        logger.info("%d already done with the same settings; --overwrite redoes them", counts["skipped"])
    elapsed = time.perf_counter() - started
    if report:
        _write_report(items, outcomes, problems, output_dir, explainer, settings)
    rate = counts["done"] / elapsed if elapsed > 0 and counts["done"] else 0.0
    failed = counts["failed"] + len(problems)
    summary = f"{counts['done']} done, {counts['skipped']} skipped, {failed} failed ({rate:.1f} img/s) -> {output_dir}"
    click.echo(summary, err=True)
    if failed:
        sys.exit(1)


def _write_report(items, outcomes, problems, output_dir: Path, explainer, settings) -> None:
    """report.html and the contact sheet(s); rows in input order (a resumed run yields its
    skipped images first), inputs that were never found first of all.

    A report that cannot be written is one Error line and exit code 1, not a traceback.
    """
    from ..errors import OutputError
    from ..outputs import ReportEntry, write_contact_sheet, write_html_report
    from ..report_rows import report_entries

    position = {id(item): index for index, item in enumerate(items)}
    ordered = sorted(outcomes, key=lambda outcome: position.get(id(outcome.item), len(position)))
    entries = [ReportEntry(source, None, error=reason) for source, reason in problems]
    entries += report_entries(ordered, limit=REPORT_ROWS, report_dir=output_dir)
    title = f"vit-explain: {settings.method} with {explainer.metadata.source_model}"
    context = _report_context(explainer.metadata, settings)
    try:
        write_html_report(output_dir / "report.html", entries, title, context)
        write_contact_sheet(output_dir / "contact_sheet.png", entries, title=title, context=context)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise fail(OutputError(f"cannot write the report in {output_dir}: {reason}")) from None


def _report_context(meta, settings):
    """The model and the settings a report shows above its maps, in words."""
    from ..methods import CLASS_SPECIFIC_METHODS
    from ..outputs.report import ReportContext

    if settings.categories:
        explained = ", ".join(f"{i} ({meta.class_name(i)})" for i in settings.categories)
    elif settings.method in CLASS_SPECIFIC_METHODS:
        explained = "each image's top-1 class" if meta.output_kind == "logits" else "each image's own features"
    else:
        explained = "no class (the method is not class-specific)"
    rows = (
        ("method", settings.method),
        ("head fusion", settings.head_fusion or "not used by this method"),
        ("discard ratio", "not used by this method" if settings.discard_ratio is None else f"{settings.discard_ratio:g}"),
        ("start layer", str(settings.start_layer)),
        ("explained", explained),
        ("overlay", f"colormap {settings.colormap}, alpha {settings.alpha:g}"),
    )
    return ReportContext(meta.source_model, meta.weights, rows, settings.colormap, meta.output_kind == "logits")

