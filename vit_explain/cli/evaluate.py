"""``vit-explain evaluate``: how faithful each method's maps are (deletion/insertion, perturbation AUCs).

Settings are checked by explain's rules, per method; the output folder is checked writable
before minutes of forward passes, and the table is printed before the files are written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import VitExplainError
from ..methods import HEAD_FUSIONS, METHOD_NAMES  # the registry imports no numpy: --help stays fast
from .common import bad_settings, check_categories, device_option, fail, logger, open_explainer, set_quiet


@click.command()
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
@device_option
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [default: onnxruntime's choice].")
@click.option("-q", "--quiet", is_flag=True, help="Only the table of results, no progress messages.")
def evaluate(inputs, model, methods, head_fusion, discard_ratio, start_layer, category_index, steps, batch_size, seed,
             output_dir, device, threads, quiet) -> None:
    """How faithful is each map? Deletion/insertion curves and positive/negative perturbation AUCs.

    Writes evaluation.csv, evaluation.json and evaluation.png (the mean curves) in the output directory.
    A setting flag goes to the methods that use it, and is refused when none of them does.
    """
    from ..evaluate import check_writable
    from ..evaluate import evaluate as run_evaluation

    set_quiet(quiet)
    explainer = open_explainer(model, device, threads)
    if category_index is not None:
        check_categories((category_index,), explainer.metadata)
    methods = tuple(methods) or METHOD_NAMES
    method_settings = _evaluation_settings(explainer, methods, head_fusion, discard_ratio, start_layer)
    try:  # minutes of work must not end in a write that could never succeed
        check_writable(output_dir)
    except VitExplainError as exc:
        raise fail(exc) from None
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
    from ..methods import SettingsError, resolve_for_methods

    try:
        resolved = resolve_for_methods(methods, head_fusion, discard_ratio, start_layer, explainer.metadata.num_layers)
    except SettingsError as exc:
        raise bad_settings(exc) from None
    settings = {}
    for method, chosen in resolved.items():
        given = {"head_fusion": chosen.head_fusion, "discard_ratio": chosen.discard_ratio}
        settings[method] = {key: value for key, value in given.items() if value is not None}
        if chosen.record.uses_start_layer:
            settings[method]["start_layer"] = chosen.start_layer
    return settings


def _load_for_evaluation(inputs, output_dir: Path):
    """The images, the names the results give them (as the user named them) and the problems, reported."""
    from ..discovery import discover_images
    from ..runtime.images import load_image

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
        raise fail(VitExplainError("no images to evaluate"))
    return images, names, problems


def _write_evaluation(result, output_dir: Path) -> None:
    """The table first (on stdout), then the files: a write that fails loses no numbers."""
    from ..evaluate import write_outputs

    click.echo(_averages_table(result))
    try:
        paths = write_outputs(result, output_dir)
    except VitExplainError as exc:
        raise fail(exc) from None
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))


def _averages_table(result) -> str:
    """The mean AUC per method and metric, as a plain text table (arrows: which way is better)."""
    from ..evaluate import METRICS

    metrics = list(result.metrics)
    header = ["method"] + [f"{m} {'(lower better)' if METRICS[m].better == 'lower' else '(higher better)'}" for m in metrics]
    rows = [[row["method"]] + [f"{row[f'{m}_auc']:.4f}" for m in metrics] for row in result.averages()]
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header] + rows)
