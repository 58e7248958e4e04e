"""``evaluate``: explain images with several methods and measure how faithful each map is.

The perturbed images are scored by a forward-only pass (``Explainer.session.run`` with no
class weights, so the graph's backward half never runs), in batches of ``batch_size`` that mix
steps, metrics and methods. The scoring model is injectable (``score_fn``), which is how the
tests check the metrics on models whose right answer is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..methods import METHOD_NAMES
from ..runtime.explainer import softmax
from ..runtime.inputs import expand_category_index
from .metrics import METRIC_NAMES, METRICS, cosine_similarity
from .perturbation import (
    BASELINES,
    baseline_images,
    patch_index_map,
    perturbation_counts,
    rank_descending,
    step_counts,
    upsample_bilinear,
)
from .result import RANDOM, EvaluationResult

__all__ = ["ScoreFn", "DEFAULT_STEPS", "DEFAULT_BATCH_SIZE", "evaluate", "evaluate_masks", "session_score_fn"]

#: ``pixels [B, 3, H, W] float32 -> [B, C]`` logits (classifier) or output features.
ScoreFn = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

DEFAULT_STEPS = 16
DEFAULT_BATCH_SIZE = 16


def session_score_fn(explainer) -> ScoreFn:
    """The explainer's own graph, forward only: ``pixels -> logits`` (or features)."""
    return lambda pixels: explainer.session.run_layers(pixels).logits  # no stacking of the maps


# -- checks ----------------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, not {value!r}")
    return int(value)


def _metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if not metrics:
        raise ValueError("no metric asked for")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRIC_NAMES)}, not {metric!r}")
    return metrics


def _baseline(kind: str, name: str) -> str:
    if kind not in BASELINES:
        raise ValueError(f"{name} must be one of {', '.join(BASELINES)}, not {kind!r}")
    return kind


def _score_batches(score_fn: ScoreFn, pixels: np.ndarray, batch_size: int, tick: Callable[[int], None]) -> np.ndarray:
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


# -- the core, given masks ---------------------------------------------------------------------
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


def _relevance_maps(masks: Mapping[str, np.ndarray], count: int, seed: int, include_random: bool) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
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
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be [batch, channels, height, width], got shape {pixels.shape}")
    count, _, height, width = pixels.shape
    if count == 0:
        raise ValueError("no images to evaluate")
    if output_kind not in ("logits", "features"):
        raise ValueError(f"output kind must be 'logits' or 'features', not {output_kind!r}")
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch size")
    seed = _seed(seed)
    metrics = _metrics(metrics)
    chosen = {
        "deletion_baseline": _baseline(deletion_baseline, "deletion baseline"),
        "insertion_baseline": _baseline(insertion_baseline, "insertion baseline"),
        "perturbation_baseline": _baseline(perturbation_baseline, "perturbation baseline"),
    }
    baseline_of = {metric: chosen[METRICS[metric].baseline_setting] for metric in metrics}
    kinds = sorted(set(baseline_of.values()))
    mean, std = normalisation if normalisation is not None else (None, None)
    maps, grid_size = _relevance_maps(masks, count, seed, include_random)
    names = tuple(str(n) for n in names) if names is not None else tuple(f"image {i}" for i in range(count))
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")

    # Schedules: how many units (patches or pixels) are perturbed at each point of each curve.
    patches = grid_size[0] * grid_size[1]
    units = {m: patches if METRICS[m].units == "patches" else height * width for m in metrics}
    counts = {m: step_counts(units[m], steps) if METRICS[m].units == "patches" else perturbation_counts(units[m]) for m in metrics}
    fractions = {m: counts[m] / units[m] for m in metrics}
    inner = sum(int(((counts[m] > 0) & (counts[m] < units[m])).sum()) for m in metrics)
    total = count * (len(kinds) + (clean_outputs is None) + inner * len(maps))
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    # Clean and fully perturbed outputs, once per image: the ends of every curve.
    if clean_outputs is None:
        clean_outputs = _score_batches(score_fn, pixels, batch_size, tick)
    clean_outputs = np.asarray(clean_outputs)
    if clean_outputs.ndim != 2 or clean_outputs.shape[0] != count:
        raise ValueError(f"clean outputs must be [{count}, outputs], got shape {clean_outputs.shape}")
    if output_kind == "logits":
        targets = tuple(int(t) for t in (clean_outputs.argmax(axis=1) if targets is None else targets))
        if len(targets) != count:
            raise ValueError(f"{len(targets)} targets for {count} images")
    else:
        targets = tuple(targets) if targets is not None else (None,) * count
    scorer = _Scorer(output_kind, clean_outputs, targets if output_kind == "logits" else None)
    everyone = np.arange(count)
    clean_end = scorer(clean_outputs, everyone)
    baseline_end = {}
    for kind in kinds:
        outputs = []
        for start in range(0, count, batch_size):
            outputs.append(_call(score_fn, baseline_images(pixels[start : start + batch_size], kind, mean, std)))
            tick(outputs[-1].shape[0])
        baseline_end[kind] = scorer(np.concatenate(outputs), everyone)

    with_top1 = output_kind == "logits"
    curves = {m: {k: np.full((count, len(counts[m])), np.nan) for k in maps} for m in metrics}
    top1 = {m: {k: np.full((count, len(counts[m])), np.nan) for k in maps} for m in metrics} if with_top1 else None
    for m in metrics:
        for j, c in enumerate(counts[m]):
            if c == 0 or c == units[m]:
                untouched = (c == 0) == (METRICS[m].start == "clean")
                score, agree = clean_end if untouched else baseline_end[baseline_of[m]]
                for k in maps:
                    curves[m][k][:, j] = score
                    if top1 is not None:
                        top1[m][k][:, j] = agree

    def perturbed() -> Iterator[tuple[tuple[str, str, int, int], np.ndarray]]:
        """Every inner point of every curve: (where it goes, the image to score), image by image."""
        patch_of_pixel = patch_index_map(grid_size, height, width)
        for i in range(count):
            image = pixels[i]
            bases = {kind: baseline_images(pixels[i : i + 1], kind, mean, std)[0] for kind in kinds}
            tie_rng = np.random.default_rng([seed, 1, i])
            patch_tie, pixel_tie = tie_rng.random((1, patches)), tie_rng.random((1, height * width))
            for k, relevance in maps.items():
                by_patch = rank_descending(relevance[i].reshape(1, -1), patch_tie)[0][patch_of_pixel]
                by_pixel = None
                for m in metrics:
                    spec = METRICS[m]
                    if spec.units == "patches":
                        order = by_patch
                    else:
                        if by_pixel is None:
                            by_pixel = upsample_bilinear(relevance[i : i + 1], height, width).reshape(1, -1)
                        signed = by_pixel if spec.first == "most" else -by_pixel
                        order = rank_descending(signed, pixel_tie)[0].reshape(height, width)
                    # order < c: the c units that change first (removed, or revealed for insertion)
                    source, changed = image, bases[baseline_of[m]]
                    if spec.start == "baseline":
                        source, changed = changed, source
                    for j, c in enumerate(counts[m]):
                        if 0 < c < units[m]:
                            yield (m, k, i, j), np.where(order < c, changed, source)

    pending: list[tuple[tuple[str, str, int, int], np.ndarray]] = []

    def flush() -> None:
        outputs = _call(score_fn, np.stack([image for _, image in pending]))
        score, agree = scorer(outputs, np.array([key[2] for key, _ in pending]))
        for n, ((m, k, i, j), _) in enumerate(pending):
            curves[m][k][i, j] = score[n]
            if top1 is not None:
                top1[m][k][i, j] = agree[n]
        tick(len(pending))
        pending.clear()

    for item in perturbed():
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()

    recorded = {"steps": steps, "seed": seed, "batch_size": batch_size, "metrics": list(metrics), **chosen}
    recorded.update(settings or {})
    return EvaluationResult(
        images=names,
        targets=targets,
        methods=tuple(maps),
        metrics=metrics,
        score_kind="probability" if output_kind == "logits" else "cosine",
        fractions=fractions,
        curves=curves,
        top1=top1,
        clean_scores=np.asarray(clean_end[0], dtype=np.float64),
        settings=recorded,
        target_names=tuple(target_names),
    )


# -- the public entry point ------------------------------------------------------------------
def _inputs(explainer, inputs, names: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    pixels, default_names = _pixels_and_names(explainer, inputs)
    if names is None:
        return pixels, default_names
    names = tuple(str(name) for name in names)
    if len(names) != pixels.shape[0]:
        raise ValueError(f"{len(names)} names for {pixels.shape[0]} images")
    return pixels, names


def _pixels_and_names(explainer, inputs) -> tuple[np.ndarray, tuple[str, ...]]:
    """Preprocessed pixels and each image's name: its path, else its file name, else "image N"."""
    if isinstance(inputs, np.ndarray):
        expected = tuple(explainer.metadata.preprocess.input_size)
        if inputs.ndim == 3:
            inputs = inputs[None]
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"a preprocessed array must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(inputs.shape)}"
            )
        return np.ascontiguousarray(inputs, dtype=np.float32), tuple(f"image {i}" for i in range(inputs.shape[0]))
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    inputs = list(inputs)
    names = []
    for index, item in enumerate(inputs):
        if isinstance(item, (str, os.PathLike)):
            names.append(os.fspath(item))
        else:
            names.append(getattr(item, "filename", "") or f"image {index}")
    return explainer.preprocess(inputs), tuple(names)


def _methods(methods: Sequence[str]) -> tuple[list[str], bool]:
    methods = list(dict.fromkeys([methods] if isinstance(methods, str) else methods))
    wants_random = RANDOM in methods
    methods = [m for m in methods if m != RANDOM]
    for method in methods:
        if method not in METHOD_NAMES:
            raise ValueError(f"method must be one of {', '.join(METHOD_NAMES + (RANDOM,))}, not {method!r}")
    if not methods:
        raise ValueError(f"give at least one of {', '.join(METHOD_NAMES)} to evaluate")
    return methods, wants_random


def evaluate(
    explainer,
    inputs,
    methods: Sequence[str] = METHOD_NAMES,
    category_index: int | Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
    include_random: bool = True,
    deletion_baseline: str = "mean",
    insertion_baseline: str = "blur",
    perturbation_baseline: str = "mean",
    score_fn: ScoreFn | None = None,
    progress: Progress | None = None,
    names: Sequence[str] | None = None,
) -> EvaluationResult:
    """Explain ``inputs`` with each of ``methods`` and score every map's faithfulness.

    ``explainer`` is a :class:`~vit_explain.runtime.Explainer` (or anything with its
    ``metadata``, ``preprocess``, ``explain`` and, without ``score_fn``, ``session``).
    ``inputs``: image paths, PIL images, or a preprocessed ``[B, 3, H, W]`` array.
    ``category_index``: the class scored and explained (one, or one per image); default each
    image's top-1 prediction. Ignored by the score of a feature model (cosine similarity to the
    clean features), but still passed to the class-specific methods.
    ``method_settings``: extra ``Explainer.explain`` arguments per method, e.g.
    ``{"rollout": {"discard_ratio": 0.9, "head_fusion": "max"}, "gae": {"start_layer": 1}}``.
    A seeded random map (``"random"``) is added unless ``include_random`` is False.
    ``score_fn`` (default: the explainer's forward-only graph) maps pixels to logits/features.
    ``progress(done, total)`` is called after each forward batch.
    ``names``: what the results call each image (default: its path; PIL images loaded by the
    caller have none, so a caller that loaded them passes the file names here).
    """
    methods, wants_random = _methods(methods)
    method_settings = dict(method_settings or {})
    for name in method_settings:
        if name not in methods:
            raise ValueError(f"settings given for {name!r}, which is not among the methods evaluated")
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch size")
    seed = _seed(seed)
    metrics = _metrics(metrics)
    _baseline(deletion_baseline, "deletion baseline")
    _baseline(insertion_baseline, "insertion baseline")
    _baseline(perturbation_baseline, "perturbation baseline")
    meta = explainer.metadata
    pixels, names = _inputs(explainer, inputs, names)
    count = pixels.shape[0]
    if count == 0:
        raise ValueError("no images to evaluate")
    score_fn = score_fn or session_score_fn(explainer)
    targets = expand_category_index(category_index, count, meta.num_outputs)

    clean = _score_batches(score_fn, pixels, batch_size, lambda n: None)
    if meta.output_kind == "logits" and targets is None:
        targets = tuple(int(t) for t in clean.argmax(axis=1))

    masks: dict[str, np.ndarray] = {}
    recorded_methods: dict[str, dict[str, Any]] = {}
    for method in methods:
        chunks = []
        for start in range(0, count, batch_size):
            chosen = list(targets[start : start + batch_size]) if targets is not None else None
            explanation = explainer.explain(
                pixels[start : start + batch_size], method=method, category_index=chosen, **method_settings.get(method, {})
            )
            chunks.append(np.asarray(explanation.masks, dtype=np.float32))
        masks[method] = np.concatenate(chunks)
        if hasattr(explanation, "settings"):
            recorded_methods[method] = explanation.settings()
        else:
            recorded_methods[method] = {"method": method, **method_settings.get(method, {})}

    settings = {
        "model": getattr(meta, "source_model", None),
        "weights": getattr(meta, "weights", None),
        "category_index": list(targets) if category_index is not None
        else "top-1 prediction" if meta.output_kind == "logits" else "own output features",
        "method_settings": recorded_methods,
    }
    target_names = ()
    if meta.output_kind == "logits" and targets is not None:
        target_names = tuple(meta.class_name(t) for t in targets)
    pre = meta.preprocess
    return evaluate_masks(
        pixels,
        masks,
        score_fn,
        output_kind=meta.output_kind,
        targets=targets,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        metrics=metrics,
        include_random=include_random or wants_random,
        deletion_baseline=deletion_baseline,
        insertion_baseline=insertion_baseline,
        perturbation_baseline=perturbation_baseline,
        normalisation=(pre.mean, pre.std),
        clean_outputs=clean,
        names=names,
        target_names=target_names,
        settings=settings,
        progress=progress,
    )
