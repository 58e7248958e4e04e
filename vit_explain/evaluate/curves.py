"""The faithfulness curves of given masks: :func:`evaluate_masks`, the core of ``evaluate``.

Each curve point scores an image with part of it perturbed (patches or pixels, in the order the
map ranks them). The clean and fully perturbed images, the ends of every curve, are scored once
per image; the inner points are scored in batches of ``batch_size`` that mix steps, metrics and
methods, always in the same order, so a result does not depend on how it was batched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.explainer import softmax
from .checks import check_baseline, check_metrics, check_positive_int, check_seed
from .metrics import METRIC_NAMES, METRICS, cosine_similarity
from .perturbation import (
    baseline_images,
    patch_index_map,
    perturbation_counts,
    rank_descending,
    step_counts,
    upsample_bilinear,
)
from .result import RANDOM, EvaluationResult

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_STEPS", "Progress", "ScoreFn", "evaluate_masks", "score_batches"]

#: ``pixels [B, 3, H, W] float32 -> [B, C]`` logits (classifier) or output features.
ScoreFn = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

DEFAULT_STEPS = 16
DEFAULT_BATCH_SIZE = 16

Key = tuple[str, str, int, int]  # (metric, method, image, step): where a score goes


def score_batches(score_fn: ScoreFn, pixels: np.ndarray, batch_size: int, tick: Callable[[int], None]) -> np.ndarray:
    """``score_fn`` over ``pixels`` in batches of ``batch_size``; ``tick(n)`` after each."""
    outputs = []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
        outputs.append(_call(score_fn, chunk))
        tick(chunk.shape[0])
    return np.concatenate(outputs, axis=0)


def _call(score_fn: ScoreFn, pixels: np.ndarray) -> np.ndarray:
    out = np.asarray(score_fn(pixels))
    if out.ndim != 2 or out.shape[0] != pixels.shape[0]:
        raise ValueError(f"score_fn must return [batch, outputs] for {pixels.shape[0]} images, got shape {out.shape}")
    return out


class _Scorer:
    """Turns model outputs into (score, top-1 agreement) for a given image."""

    def __init__(self, output_kind: str, clean: np.ndarray, targets: tuple[int, ...] | None) -> None:
        self.output_kind = output_kind
        self.clean = clean.astype(np.float64)
        self.targets = np.asarray(targets, dtype=np.int64) if targets is not None else None
        self.clean_top1 = self.clean.argmax(axis=1)

    def __call__(self, outputs: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.output_kind == "logits":
            probabilities = softmax(outputs)
            score = probabilities[np.arange(len(images)), self.targets[images]]
            agree = (outputs.argmax(axis=1) == self.clean_top1[images]).astype(np.float64)
            return score, agree
        return cosine_similarity(outputs, self.clean[images]), None


def _relevance_maps(
    masks: Mapping[str, np.ndarray], count: int, seed: int, include_random: bool
) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The maps to evaluate, float64 ``[count, gh, gw]`` each, plus the seeded random one."""
    methods = [name for name in masks if name != RANDOM]
    if not methods:
        raise ValueError("give at least one method's masks (the random baseline takes its patch grid from them)")
    shapes = {np.asarray(masks[name]).shape for name in methods}
    if len(shapes) > 1:
        raise ValueError(f"masks have different shapes: {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 3 or shape[0] != count:
        raise ValueError(f"masks must be [{count}, grid_h, grid_w] for {count} images, got {shape}")
    grid_size = (int(shape[1]), int(shape[2]))
    maps = {name: np.asarray(masks[name], dtype=np.float64) for name in methods}
    if include_random or RANDOM in masks:
        # One seeded uniform map per image, independent of batching and of the other methods.
        maps[RANDOM] = np.stack([np.random.default_rng([seed, 0, i]).random(grid_size) for i in range(count)])
    return maps, grid_size


@dataclass(frozen=True)
class _Plan:
    """Everything the curves are computed from, checked: the pixels, the maps, each metric's
    baseline and schedule (how many units, patches or pixels, are perturbed at each point)."""

    pixels: np.ndarray
    maps: dict[str, np.ndarray]
    grid_size: tuple[int, int]
    metrics: tuple[str, ...]
    baseline_of: dict[str, str]  # metric -> baseline kind
    kinds: list[str]  # the baseline kinds in use, sorted
    normalisation: tuple[Any, Any]  # (mean, std), or (None, None)
    seed: int
    steps: int
    batch_size: int
    baselines: dict[str, str]  # setting name -> kind, as recorded
    units: dict[str, int]
    counts: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return self.pixels.shape[0]

    def inner_points(self) -> int:
        """Curve points per image and map that are neither end (each needs its own forward pass)."""
        return sum(int(((self.counts[m] > 0) & (self.counts[m] < self.units[m])).sum()) for m in self.metrics)


def _schedules(metrics: tuple[str, ...], grid_size: tuple[int, int], height: int, width: int, steps: int):
    """Per metric: units to perturb in all, and how many at each curve point."""
    patches = grid_size[0] * grid_size[1]
    units = {m: patches if METRICS[m].units == "patches" else height * width for m in metrics}
    counts = {m: step_counts(units[m], steps) if METRICS[m].units == "patches" else perturbation_counts(units[m]) for m in metrics}
    return units, counts


def _targets(output_kind: str, clean_outputs: np.ndarray, targets, count: int) -> tuple:
    """The class scored per image (default its clean top-1); ``None`` each for feature models."""
    if output_kind != "logits":
        return tuple(targets) if targets is not None else (None,) * count
    targets = tuple(int(t) for t in (clean_outputs.argmax(axis=1) if targets is None else targets))
    if len(targets) != count:
        raise ValueError(f"{len(targets)} targets for {count} images")
    return targets


def _baseline_ends(plan: _Plan, score_fn: ScoreFn, scorer: _Scorer, batch_size: int, tick) -> dict[str, tuple]:
    """(score, agreement) of each image fully perturbed, per baseline kind."""
    mean, std = plan.normalisation
    everyone = np.arange(plan.count)
    ends = {}
    for kind in plan.kinds:
        outputs = []
        for start in range(0, plan.count, batch_size):
            outputs.append(_call(score_fn, baseline_images(plan.pixels[start : start + batch_size], kind, mean, std)))
            tick(outputs[-1].shape[0])
        ends[kind] = scorer(np.concatenate(outputs), everyone)
    return ends


def _curves_with_ends(plan: _Plan, clean_end: tuple, baseline_end: dict[str, tuple], with_top1: bool):
    """Curves and top-1 agreements (NaN for the inner points, filled later) with both ends set."""
    def empty():
        return {m: {k: np.full((plan.count, len(plan.counts[m])), np.nan) for k in plan.maps} for m in plan.metrics}

    curves, top1 = empty(), (empty() if with_top1 else None)
    for m in plan.metrics:
        for j, c in enumerate(plan.counts[m]):
            if c == 0 or c == plan.units[m]:
                untouched = (c == 0) == (METRICS[m].start == "clean")
                score, agree = clean_end if untouched else baseline_end[plan.baseline_of[m]]
                for k in plan.maps:
                    curves[m][k][:, j] = score
                    if top1 is not None:
                        top1[m][k][:, j] = agree
    return curves, top1


def _perturbed(plan: _Plan) -> Iterator[tuple[Key, np.ndarray]]:
    """Every inner point of every curve: (where it goes, the image to score), image by image."""
    _, _, height, width = plan.pixels.shape
    mean, std = plan.normalisation
    patches = plan.grid_size[0] * plan.grid_size[1]
    patch_of_pixel = patch_index_map(plan.grid_size, height, width)
    for i in range(plan.count):
        image = plan.pixels[i]
        bases = {kind: baseline_images(plan.pixels[i : i + 1], kind, mean, std)[0] for kind in plan.kinds}
        tie_rng = np.random.default_rng([plan.seed, 1, i])
        patch_tie, pixel_tie = tie_rng.random((1, patches)), tie_rng.random((1, height * width))
        for k, relevance in plan.maps.items():
            by_patch = rank_descending(relevance[i].reshape(1, -1), patch_tie)[0][patch_of_pixel]
            by_pixel = None
            for m in plan.metrics:
                spec = METRICS[m]
                if spec.units == "patches":
                    order = by_patch
                else:
                    if by_pixel is None:
                        by_pixel = upsample_bilinear(relevance[i : i + 1], height, width).reshape(1, -1)
                    signed = by_pixel if spec.first == "most" else -by_pixel
                    order = rank_descending(signed, pixel_tie)[0].reshape(height, width)
                # order < c: the c units that change first (removed, or revealed for insertion)
                source, changed = image, bases[plan.baseline_of[m]]
                if spec.start == "baseline":
                    source, changed = changed, source
                for j, c in enumerate(plan.counts[m]):
                    if 0 < c < plan.units[m]:
                        yield (m, k, i, j), np.where(order < c, changed, source)


def _score_inner_points(plan: _Plan, score_fn: ScoreFn, scorer: _Scorer, batch_size: int, curves, top1, tick) -> None:
    """Score :func:`_perturbed`'s images in batches of ``batch_size``, into ``curves``/``top1``."""
    pending: list[tuple[Key, np.ndarray]] = []

    def flush() -> None:
        outputs = _call(score_fn, np.stack([image for _, image in pending]))
        score, agree = scorer(outputs, np.array([key[2] for key, _ in pending]))
        for n, ((m, k, i, j), _) in enumerate(pending):
            curves[m][k][i, j] = score[n]
            if top1 is not None:
                top1[m][k][i, j] = agree[n]
        tick(len(pending))
        pending.clear()

    for item in _perturbed(plan):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()


class _Ticker:
    """Counts forward passes done and reports ``(done, total)`` to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _plan(pixels, masks, output_kind, steps, batch_size, seed, metrics, include_random, baselines: dict[str, str],
          normalisation) -> _Plan:
    """Check ``evaluate_masks``' arguments (in the order of its signature) and derive what the curves need."""
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be [batch, channels, height, width], got shape {pixels.shape}")
    count, _, height, width = pixels.shape
    if count == 0:
        raise ValueError("no images to evaluate")
    if output_kind not in ("logits", "features"):
        raise ValueError(f"output kind must be 'logits' or 'features', not {output_kind!r}")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch size")
    seed = check_seed(seed)
    metrics = check_metrics(metrics)
    baselines = {
        setting: check_baseline(kind, setting.replace("_", " ")) for setting, kind in baselines.items()
    }
    baseline_of = {metric: baselines[METRICS[metric].baseline_setting] for metric in metrics}
    maps, grid_size = _relevance_maps(masks, count, seed, include_random)
    units, counts = _schedules(metrics, grid_size, height, width, steps)
    return _Plan(
        pixels, maps, grid_size, metrics, baseline_of, sorted(set(baseline_of.values())),
        normalisation if normalisation is not None else (None, None), seed, steps, batch_size, baselines, units, counts,
    )


def evaluate_masks(
    pixels: np.ndarray,
    masks: Mapping[str, np.ndarray],
    score_fn: ScoreFn,
    output_kind: str = "logits",
    targets: Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    include_random: bool = True,
    deletion_baseline: str = "mean",
    insertion_baseline: str = "blur",
    perturbation_baseline: str = "mean",
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    clean_outputs: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    target_names: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Faithfulness curves of given ``masks`` (method name -> ``[B, grid_h, grid_w]``) on ``pixels``.

    ``pixels`` are preprocessed ``[B, 3, H, W]``; ``score_fn`` maps such a batch to ``[B, C]``
    logits (``output_kind="logits"``) or features (``"features"``). ``targets`` are the classes
    whose probability is scored (default: each clean image's top-1); not used for features.
    ``normalisation`` = (mean, std) is needed only for the ``"black"`` baseline;
    ``clean_outputs`` saves the forward pass of the unperturbed images when already known.
    The method name ``"random"`` is reserved for the seeded random map.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    baselines = {
        "deletion_baseline": deletion_baseline,
        "insertion_baseline": insertion_baseline,
        "perturbation_baseline": perturbation_baseline,
    }
    plan = _plan(pixels, masks, output_kind, steps, batch_size, seed, metrics, include_random, baselines, normalisation)
    count, batch_size = plan.count, plan.batch_size
    names = tuple(str(n) for n in names) if names is not None else tuple(f"image {i}" for i in range(count))
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")
    tick = _Ticker(count * (len(plan.kinds) + (clean_outputs is None) + plan.inner_points() * len(plan.maps)), progress)

    # Clean and fully perturbed outputs, once per image: the ends of every curve.
    if clean_outputs is None:
        clean_outputs = score_batches(score_fn, pixels, batch_size, tick)
    clean_outputs = np.asarray(clean_outputs)
    if clean_outputs.ndim != 2 or clean_outputs.shape[0] != count:
        raise ValueError(f"clean outputs must be [{count}, outputs], got shape {clean_outputs.shape}")
    targets = _targets(output_kind, clean_outputs, targets, count)
    scorer = _Scorer(output_kind, clean_outputs, targets if output_kind == "logits" else None)
    clean_end = scorer(clean_outputs, np.arange(count))
    baseline_end = _baseline_ends(plan, score_fn, scorer, batch_size, tick)
    curves, top1 = _curves_with_ends(plan, clean_end, baseline_end, with_top1=output_kind == "logits")
    _score_inner_points(plan, score_fn, scorer, batch_size, curves, top1, tick)

    recorded = {"steps": plan.steps, "seed": plan.seed, "batch_size": batch_size, "metrics": list(plan.metrics), **plan.baselines}
    recorded.update(settings or {})
    return EvaluationResult(
        images=names,
        targets=targets,
        methods=tuple(plan.maps),
        metrics=plan.metrics,
        score_kind="probability" if output_kind == "logits" else "cosine",
        fractions={m: plan.counts[m] / plan.units[m] for m in plan.metrics},
        curves=curves,
        top1=top1,
        clean_scores=np.asarray(clean_end[0], dtype=np.float64),
        settings=recorded,
        target_names=tuple(target_names),
    )
