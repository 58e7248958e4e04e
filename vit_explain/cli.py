"""The ``vit-explain`` command line: export, explain, info.

Bad arguments are click usage errors (one line, exit code 2); anything vit-explain reports
about models, images or exports is one ``Error:`` line with exit code 1; never a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import VitExplainError

HEAD_FUSIONS = ("mean", "min", "max")


class _UserError(click.ClickException):
    """A VitExplainError shown as one line (exit code 1)."""


def _fail(exc: Exception) -> click.ClickException:
    return _UserError(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the model [default: models/<name>.onnx].")
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
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    try:
        result = export_model(spec, output, class_names_file=class_names, opset=opset, log=log)
    except VitExplainError as exc:
        raise _fail(exc) from None
    click.echo(str(result.path))


# -- info ---------------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(model: Path) -> None:
    """Print what an exported model is: source, input size, preprocessing, token layout, classes."""
    from .runtime.session import ModelSession

    try:
        session = ModelSession(model, device="cpu")
    except VitExplainError as exc:
        raise _fail(exc) from None
    meta = session.metadata
    for key, value in meta.describe().items():
        click.echo(f"{key:>15}: {value}")
    if meta.class_names:
        shown = ", ".join(meta.class_names[:5])
        click.echo(f"{'class names':>15}: {shown}, ... ({len(meta.class_names)})")
    click.echo(f"{'file':>15}: {model} ({model.stat().st_size / 1e6:.1f} MB)")


# -- explain ------------------------------------------------------------------------------
@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--model", default=None, metavar="FILE|NAME",
              help="An exported .onnx file, or a timm model name (exported once into the cache). [default: deit_tiny_patch16_224]")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("vit-explain-out"), show_default=True)
@click.option("--method", type=click.Choice(["rollout", "grad_rollout"]), help="Default: rollout, or grad_rollout when --category-index is given.")
@click.option("--head-fusion", type=click.Choice(HEAD_FUSIONS), help="Default: max for rollout, mean for grad_rollout.")
@click.option("--discard-ratio", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.9, show_default=True,
              help="Share of the lowest attentions dropped per layer, in [0, 1).")
@click.option("--category-index", "category_index", type=click.IntRange(min=0), multiple=True,
              help="Class to explain (repeatable: one map per class). Implies grad_rollout.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--format", "formats", type=click.Choice(["png", "npy", "json"]), multiple=True,
              help="Outputs to write (repeatable). [default: png, npy and json]")
@click.option("--colormap", default="jet", show_default=True, help="Any matplotlib colormap name.")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Weight of the heat map in the overlay.")
@click.option("--overwrite", is_flag=True, help="Redo images whose outputs exist (default: skip them, so a rerun resumes).")
@click.option("--report", is_flag=True, help="Also write report.html and contact_sheet.png in the output directory.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [default: onnxruntime's choice].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-image messages.")
def explain(inputs, model, output_dir, method, head_fusion, discard_ratio, category_index, batch_size, formats,
            colormap, alpha, overwrite, report, device, threads, quiet) -> None:
    """Explain images: files, folders (recursive) or glob patterns.

    Writes, per image and map, an overlay PNG at the image's size, the raw mask (.npy, patch grid)
    and one JSON with the top-5 predictions and the settings used.
    """
    from .model_store import DEFAULT_MODEL, resolve_model
    from .outputs import available_colormaps, discover_images
    from .pipeline import FORMATS, ExplainSettings
    from .runtime import Explainer

    if colormap not in available_colormaps():
        raise click.BadParameter(f"unknown colormap {colormap!r} (for example: jet, viridis, inferno, turbo)", param_hint="--colormap")
    say = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    try:
        explainer = Explainer(resolve_model(model or DEFAULT_MODEL, notify=say), device=device, threads=threads)
    except VitExplainError as exc:
        raise _fail(exc) from None
    meta = explainer.metadata
    categories = tuple(category_index) or None
    for index in categories or ():
        if index >= meta.num_outputs:
            kind = "classes" if meta.output_kind == "logits" else "output features"
            raise click.BadParameter(f"{index} is out of range: the model has {meta.num_outputs} {kind} (0..{meta.num_outputs - 1})",
                                     param_hint="--category-index")
    if method == "rollout" and categories:
        raise click.BadParameter("--category-index applies to grad_rollout, not rollout", param_hint="--method")
    method, head_fusion, discard_ratio = explainer.resolve_settings(method, head_fusion, discard_ratio, bool(categories))
    settings = ExplainSettings(
        method, head_fusion, discard_ratio, categories, "top1" if meta.output_kind == "logits" else "features",
        tuple(formats) or FORMATS, colormap, alpha, overwrite,
    )

    items, problems = discover_images(list(inputs), exclude=[output_dir])
    for source, reason in problems:
        click.echo(f"skipping {source}: {reason}", err=True)
    if not items:
        raise _fail(VitExplainError("no images to explain"))
    _run_explain(explainer, items, output_dir, settings, batch_size, report, quiet, len(problems))


def _run_explain(explainer, items, output_dir: Path, settings, batch_size: int, report: bool, quiet: bool, problems: int) -> None:
    from .pipeline import explain_images

    counts = {"done": 0, "skipped": 0, "failed": 0}
    outcomes = []
    show_bar = not quiet and sys.stderr.isatty()
    started = time.perf_counter()
    progress = None
    if show_bar:
        from tqdm import tqdm

        progress = tqdm(total=len(items), unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        for outcome in explain_images(explainer, items, output_dir, settings, batch_size):
            counts[outcome.status] += 1
            outcomes.append(outcome)
            if outcome.status == "failed":
                message = f"failed: {outcome.error}"
                if progress is not None:
                    progress.write(message, file=sys.stderr)
                else:
                    click.echo(message, err=True)
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    elapsed = time.perf_counter() - started
    if report:
        _write_report(outcomes, output_dir, explainer, settings)
    rate = counts["done"] / elapsed if elapsed > 0 and counts["done"] else 0.0
    failed = counts["failed"] + problems
    summary = f"{counts['done']} done, {counts['skipped']} skipped, {failed} failed ({rate:.1f} img/s) -> {output_dir}"
    click.echo(summary, err=True)
    if failed:
        sys.exit(1)


def _write_report(outcomes, output_dir: Path, explainer, settings) -> None:
    from .outputs import write_contact_sheet, write_html_report
    from .pipeline import report_entries

    entries = report_entries(outcomes)
    title = f"vit-explain: {settings.method} with {explainer.metadata.source_model}"
    write_html_report(output_dir / "report.html", entries, title)
    write_contact_sheet(output_dir / "contact_sheet.png", entries, title=title)


if __name__ == "__main__":  # pragma: no cover
    main()
