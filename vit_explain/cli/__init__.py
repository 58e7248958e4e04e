"""The ``vit-explain`` command line: export, explain, evaluate, info.

Bad arguments are click usage errors (one line, exit code 2); anything vit-explain reports
about models, images or exports is one ``Error:`` line with exit code 1; never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click

from . import __version__
from .errors import OutputError, VitExplainError
from .methods import HEAD_FUSIONS, METHOD_NAMES  # the registry imports no numpy: --help stays fast

#: The CLI's own progress lines; the library's modules log under "vit_explain.<module>".
logger = logging.getLogger("vit_explain.cli")


class _StderrLines(logging.Handler):
    """Each record as its bare message on stderr, the lines users saw before there was logging;
    through the progress bar's ``write`` while one is drawn, so the bar is not torn."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bar = None  # a tqdm bar while explain draws one
        self.addFilter(self._not_export_steps)

    @staticmethod
    def _not_export_steps(record: logging.LogRecord) -> bool:
        """A first-run export inside explain/evaluate is one line (model_store's), as before:
        the exporter's own steps are the ``export`` command's to show."""
        return record.levelno >= logging.WARNING or not record.name.startswith("vit_explain.export")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)  # sys.stderr as it is now: click's test runner swaps it


_LINES = _StderrLines()


@contextlib.contextmanager
def _progress_lines() -> Iterator[None]:
    """The one stderr handler, on the "vit_explain" logger for one command (INFO; a command's
    ``-q`` raises it to WARNING), and not passed on to the root logger: an application that
    configured logging gets no second copy, and the library stays silent outside the CLI."""
    package = logging.getLogger("vit_explain")
    level, propagate = package.level, package.propagate
    package.addHandler(_LINES)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(_LINES)
        package.setLevel(level)
        package.propagate = propagate
        _LINES.setLevel(logging.INFO)
        _LINES.bar = None


def _quiet(quiet: bool) -> None:
    """``-q``: warnings (a failed or skipped input) still show, progress lines do not."""
    _LINES.setLevel(logging.WARNING if quiet else logging.INFO)


class _UserError(click.ClickException):
    """A VitExplainError shown as one line (exit code 1)."""


def _fail(exc: Exception) -> click.ClickException:
    return _UserError(str(exc))


class _Group(click.Group):
    """Ctrl-C in any command: one ``interrupted`` line and exit code 130 (128 + SIGINT, what a
    shell reports), instead of click's ``Aborted!`` with exit code 1."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with the whole first line of its help (click cuts it at ~45 characters)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.short_help or (command.help or "").strip().splitlines()[0]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            with _progress_lines():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vit-explain")
def main() -> None:
    """Where did the Vision Transformer look? Attention Rollout and Gradient Rollout, fast."""


# -- export -------------------------------------------------------------------------------
def _img_size(_ctx, _param, value: str | None) -> tuple[int, int] | None:
    from .metadata import parse_img_size

    try:
        return parse_img_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("model_name")
@click.option("--weights", default="pretrained", show_default=True,
              help="'pretrained' (timm's, needs network or its cache), 'random' (seeded test model) or a local .safetensors/.pth state dict.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option("--img-size", callback=_img_size, metavar="N|HxW", help="Input size, e.g. 384 or 224x320 (height x width).")
@click.option("--num-classes", type=click.IntRange(min=0), help="Classifier size for a fine-tuned checkpoint (0: no head, explain features).")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Text file, one class name per line.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the model [default: models/MODEL_NAME.onnx, with _HxW for --img-size and _random<seed> or _<checkpoint name> for --weights].")
@click.option("--opset", type=click.IntRange(18, 23), default=20, show_default=True, help="ONNX opset.")
def export(model_name, weights, seed, img_size, num_classes, class_names, output, opset) -> None:
    """Export a timm Vision Transformer (MODEL_NAME) to a checked vit-explain ONNX model."""
    try:
        from .export import ModelSpec, default_output_path, export_model
    except ImportError as exc:
        raise _fail(VitExplainError(f'export needs PyTorch and timm ({exc.name} is missing): pip install -e ".[export]"')) from None
    if weights not in ("pretrained", "random") and not Path(weights).is_file():
        raise click.BadParameter(f"{weights!r} is neither 'pretrained', 'random' nor an existing file", param_hint="--weights")
    spec = ModelSpec(model_name, weights=weights, seed=seed, img_size=img_size, num_classes=num_classes)
    output = output or default_output_path(spec)
    try:
        with _export_progress_to_stderr():
            result = export_model(spec, output, class_names_file=class_names, opset=opset)
    except VitExplainError as exc:
        raise _fail(exc) from None
    click.echo(str(result.path))


@contextlib.contextmanager
def _export_progress_to_stderr() -> Iterator[None]:
    """The exporter's progress lines (logger ``vit_explain.export``, INFO) on stderr, one line
    each as written, for the duration of the command; not passed on to parent loggers, so a
    handler set up elsewhere does not print them twice."""
    import logging

    class _Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(record.getMessage(), err=True)

    logger = logging.getLogger("vit_explain.export")
    handler, level, propagate = _Echo(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


# -- info ---------------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(model: Path) -> None:
    """Print what an exported model is: source, input size, preprocessing, token layout, classes."""
    from .model_store import check_not_checkpoint
    from .runtime.session import ModelSession

    try:
        check_not_checkpoint(model)
        session = ModelSession(model, device="cpu")
    except VitExplainError as exc:
        raise _fail(exc) from None
    meta = session.metadata
    for key, value in meta.describe().items():
        click.echo(f"{key:>15}: {value}")
    if meta.class_names:
        shown = ", ".join(meta.class_names[:5]) + (", ..." if len(meta.class_names) > 5 else "")
        click.echo(f"{'class names':>15}: {shown} ({len(meta.class_names)})")
    click.echo(f"{'file':>15}: {model} ({model.stat().st_size / 1e6:.1f} MB)")
    # What people compare with a published hash (sha256sum): changes with any byte of the file.
    click.echo(f"{'file sha256':>15}: {_file_sha256(model)}")


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- explain ------------------------------------------------------------------------------
@main.command()
@click.argument("inputs", nargs=-1, required=True)
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs: auto takes CUDA when onnxruntime-gpu and a GPU are there.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [default: onnxruntime's choice].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-image messages.")
def explain(inputs, model, output_dir, method, head_fusion, discard_ratio, start_layer, category_index, batch_size,
            formats, colormap, alpha, overwrite, report, device, threads, quiet) -> None:
    """Explain images: files, folders (recursive) or glob patterns.

    In folders and patterns, files with a photo's extension or image content are taken; one that
    cannot be read is reported with the reason, and the others go on.

    Writes, per image and map, an overlay PNG at the image's size, the raw mask (.npy, patch grid)
    and one JSON with the top-5 predictions and the settings used.
    """
    from .discovery import discover_images
    from .outputs import available_colormaps
    from .pipeline import FORMATS, ExplainSettings

    if colormap not in available_colormaps():
        raise click.BadParameter(f"unknown colormap {colormap!r} (for example: jet, viridis, inferno, turbo)", param_hint="--colormap")
    _quiet(quiet)
    with _interrupts_stop_cleanly():
        # Everything that needs no model first: a typo must not wait for a model download.
        chosen = _check_method_flags(method, head_fusion, discard_ratio, start_layer, category_index)
        items, problems = discover_images(list(inputs), exclude=[output_dir])
        for source, reason in problems:
            logger.warning("skipping %s: %s", source, reason)
        if not items:
            raise _fail(VitExplainError("no images to explain"))
        _check_output_dir_early(output_dir)
        with _open_explainer(model, device, threads) as explainer:
            meta = explainer.metadata
            categories = _check_categories(category_index, meta)
            resolved = _resolve_method(explainer, chosen, head_fusion, discard_ratio, start_layer, categories)
            settings = ExplainSettings(
                resolved.method, resolved.head_fusion, resolved.discard_ratio, categories,
                "top1" if meta.output_kind == "logits" else "features",
                tuple(formats) or FORMATS, colormap, alpha, overwrite, start_layer, meta.weights_sha256,
            )
            _check_output_dir(output_dir)
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
        raise _fail(OutputError(f"cannot write to {output_dir}: {existing} is not a folder"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(OutputError(f"cannot write to {output_dir}: {existing} is not writable"))


def _check_output_dir(output_dir: Path) -> None:
    """Just before the work: create the folder and write (and remove) a small probe file, so a
    read-only, full or forbidden folder is one line now rather than a failure for every image."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir, prefix=".vit-explain-probe-") as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise _fail(OutputError(f"cannot write to {output_dir}: {exc.strerror or exc}")) from None


def _open_explainer(model: str | None, device: str, threads: int | None):
    from .model_store import DEFAULT_MODEL, resolve_model
    from .runtime import Explainer

    try:
        return Explainer(resolve_model(model or DEFAULT_MODEL), device=device, threads=threads)
    except VitExplainError as exc:
        raise _fail(exc) from None


def _check_categories(category_index: tuple[int, ...], meta) -> tuple[int, ...] | None:
    for index in category_index:
        if index >= meta.num_outputs:
            kind = "classes" if meta.output_kind == "logits" else "output features"
            raise click.BadParameter(
                f"{index} is out of range: the model has {meta.num_outputs} {kind} (0..{meta.num_outputs - 1})",
                param_hint="--category-index",
            )
    return tuple(category_index) or None


#: The CLI's name for each setting a SettingsError may name or blame.
_FLAGS = {
    "method": "--method", "head_fusion": "--head-fusion", "discard_ratio": "--discard-ratio",
    "start_layer": "--start-layer", "category_index": "--category-index",
}


def _bad_settings(error) -> click.BadParameter:
    """A :class:`~vit_explain.methods.SettingsError` as a usage error: the Python API's sentence
    with the flags' names, pointing at the option to change."""
    return click.BadParameter(error.message_for(_FLAGS.__getitem__), param_hint=_FLAGS[error.blame])


def _check_method_flags(method, head_fusion, discard_ratio, start_layer, categories) -> str:
    """The method, and a usage error for a flag it does not use (with the reason): the one
    ``resolve_settings``, applied before any model is opened (the layer count comes later)."""
    from .methods import SettingsError, resolve_settings

    try:
        chosen = resolve_settings(
            method, head_fusion, discard_ratio, start_layer, has_category=bool(categories), refuse_category=True
        )
    except SettingsError as exc:
        raise _bad_settings(exc) from None
    return chosen.method


def _resolve_method(explainer, chosen, head_fusion, discard_ratio, start_layer, categories):
    """Defaults per method, once the model is known (its layer count bounds --start-layer)."""
    from .methods import SettingsError, resolve_settings

    try:
        return resolve_settings(
            chosen, head_fusion, discard_ratio, start_layer, has_category=bool(categories), refuse_category=True,
            num_layers=explainer.metadata.num_layers,
        )
    except SettingsError as exc:
        raise _bad_settings(exc) from None


#: The most images a report shows (thumbnails of the first ones, kept while the files are written).
REPORT_ROWS = 1000


def _run_explain(explainer, items, output_dir: Path, settings, batch_size: int, report: bool, quiet: bool,
                 problems: list[tuple[str, str]]) -> None:
    from .pipeline import explain_images

    counts = {"done": 0, "skipped": 0, "failed": 0}
    outcomes = []
    show_bar = not quiet and sys.stderr.isatty()
    started = time.perf_counter()
    progress = None
    if show_bar:
        from tqdm import tqdm

        progress = tqdm(total=len(items), unit="img", file=sys.stderr, dynamic_ncols=True)

    _LINES.bar = progress
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
        _LINES.bar = None
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
    from .errors import OutputError
    from .outputs import ReportEntry, write_contact_sheet, write_html_report
    from .report_rows import report_entries

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
        raise _fail(OutputError(f"cannot write the report in {output_dir}: {reason}")) from None


def _report_context(meta, settings):
    """The model and the settings a report shows above its maps, in words."""
    from .methods import CLASS_SPECIFIC_METHODS
    from .outputs.report import ReportContext

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


# -- evaluate -----------------------------------------------------------------------------
@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--model", default=None, metavar="FILE|NAME", help="As for explain. [default: deit_tiny_patch16_224]")
@click.option("--method", "methods", type=click.Choice(METHOD_NAMES), multiple=True,
              help="Method to evaluate (repeatable). [default: all four] A seeded random map is always added.")
@click.option("--head-fusion", type=click.Choice(HEAD_FUSIONS),
              help="As for explain, given to the methods that fuse heads. Default: max for rollout, mean for grad_rollout and attention.")
@click.option("--discard-ratio", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="As for explain, given to rollout and grad_rollout, in [0, 1). [default: 0.9]")
@click.option("--start-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="As for explain, given to rollout, grad_rollout and gae.")
@click.option("--category-index", type=click.IntRange(min=0), help="Class whose probability is scored [default: each image's top-1].")
@click.option("--steps", type=click.IntRange(min=2), default=16, show_default=True, help="Deletion/insertion steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per forward pass of the perturbed copies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-map baseline.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vit-explain-eval"), show_default=True,
              help="Folder for evaluation.csv, evaluation.json and evaluation.png.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where onnxruntime runs: auto takes CUDA when onnxruntime-gpu and a GPU are there.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [default: onnxruntime's choice].")
@click.option("-q", "--quiet", is_flag=True, help="Only the table of results, no progress messages.")
def evaluate(inputs, model, methods, head_fusion, discard_ratio, start_layer, category_index, steps, batch_size, seed,
             output_dir, device, threads, quiet) -> None:
    """How faithful is each map? Deletion/insertion curves and positive/negative perturbation AUCs.

    Writes evaluation.csv, evaluation.json and evaluation.png (the mean curves) in the output directory.
    A setting flag goes to the methods that use it, and is refused when none of them does.
    """
    from .evaluate import check_writable
    from .evaluate import evaluate as run_evaluation

    _quiet(quiet)
    explainer = _open_explainer(model, device, threads)
    if category_index is not None:
        _check_categories((category_index,), explainer.metadata)
    methods = tuple(methods) or METHOD_NAMES
    method_settings = _evaluation_settings(explainer, methods, head_fusion, discard_ratio, start_layer)
    try:  # minutes of work must not end in a write that could never succeed
        check_writable(output_dir)
    except VitExplainError as exc:
        raise _fail(exc) from None
    images, names, problems = _load_for_evaluation(inputs, output_dir)
    logger.info("evaluating %d images, %d methods (about %d forward passes)", len(images), len(methods), len(images) * 15 * steps)
    try:
        result = run_evaluation(
            explainer, images, methods=methods, category_index=category_index, steps=steps,
            batch_size=batch_size, seed=seed, method_settings=method_settings, names=names,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _write_evaluation(result, output_dir)
    if problems:
        sys.exit(1)


def _evaluation_settings(explainer, methods: tuple[str, ...], head_fusion, discard_ratio, start_layer: int) -> dict[str, dict]:
    """Each method's explain settings, defaulted and checked by explain's own rules.

    Evaluating several methods at once is the point of ``evaluate``, so a flag goes to the
    methods that use it (``--head-fusion min`` with the default four leaves gae alone); a flag
    that none of them uses would change nothing, and is refused as explain refuses it.
    """
    from .methods import SettingsError, resolve_for_methods

    try:
        resolved = resolve_for_methods(methods, head_fusion, discard_ratio, start_layer, explainer.metadata.num_layers)
    except SettingsError as exc:
        raise _bad_settings(exc) from None
    settings = {}
    for method, chosen in resolved.items():
        given = {"head_fusion": chosen.head_fusion, "discard_ratio": chosen.discard_ratio}
        settings[method] = {key: value for key, value in given.items() if value is not None}
        if chosen.record.uses_start_layer:
            settings[method]["start_layer"] = chosen.start_layer
    return settings


def _load_for_evaluation(inputs, output_dir: Path):
    """The images, the names the results give them (as the user named them) and the problems, reported."""
    from .discovery import discover_images
    from .runtime.images import load_image

    items, problems = discover_images(list(inputs), exclude=[output_dir])
    for source, reason in problems:
        logger.warning("skipping %s: %s", source, reason)
    images, names = [], []
    for item in items:
        try:
            images.append(load_image(item.path))
            names.append(str(item.path))
        except VitExplainError as exc:
            problems.append((str(item.path), str(exc)))
            logger.warning("failed: %s", exc)
    if not images:
        raise _fail(VitExplainError("no images to evaluate"))
    return images, names, problems


def _write_evaluation(result, output_dir: Path) -> None:
    """The table first (on stdout), then the files: a write that fails loses no numbers."""
    from .evaluate import write_outputs

    click.echo(_averages_table(result))
    try:
        paths = write_outputs(result, output_dir)
    except VitExplainError as exc:
        raise _fail(exc) from None
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def _averages_table(result) -> str:
    """The mean AUC per method and metric, as a plain text table (arrows: which way is better)."""
    from .evaluate import METRICS

    metrics = list(result.metrics)
    header = ["method"] + [f"{m} {'(lower better)' if METRICS[m].better == 'lower' else '(higher better)'}" for m in metrics]
    rows = [[row["method"]] + [f"{row[f'{m}_auc']:.4f}" for m in metrics] for row in result.averages()]
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header] + rows)


if __name__ == "__main__":  # pragma: no cover
    main()
