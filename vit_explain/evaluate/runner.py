"""``evaluate``: explain images with several methods and measure how faithful each map is.

The perturbed images are scored by a forward-only pass (``Explainer.session.run`` with no
class weights, so the graph's backward half never runs), in batches of ``batch_size`` that mix
steps, metrics and methods (:mod:`.curves`). The scoring model is injectable (``score_fn``),
which is how the tests check the metrics on models whose right answer is known.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..methods import METHOD_NAMES
from ..runtime.inputs import expand_category_index
from .checks import check_baseline, check_metrics, check_positive_int, check_seed
from .curves import DEFAULT_BATCH_SIZE, DEFAULT_STEPS, Progress, ScoreFn, evaluate_masks, score_batches
from .metrics import METRIC_NAMES
from .result import RANDOM, EvaluationResult

__all__ = ["ScoreFn", "DEFAULT_STEPS", "DEFAULT_BATCH_SIZE", "evaluate", "evaluate_masks", "session_score_fn"]


def session_score_fn(explainer) -> ScoreFn:
    """The explainer's own graph, forward only: ``pixels -> logits`` (or features)."""
    return lambda pixels: explainer.session.run_layers(pixels).logits  # no stacking of the maps


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


def _explain_all(explainer, pixels: np.ndarray, methods: list[str], targets, batch_size: int,
                 method_settings: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Each method's masks for every image (``batch_size`` at a time, each image explaining its
    scored class), and the settings each method recorded."""
    masks: dict[str, np.ndarray] = {}
    recorded: dict[str, dict[str, Any]] = {}
    for method in methods:
        chunks = []
        for start in range(0, pixels.shape[0], batch_size):
            chosen = list(targets[start : start + batch_size]) if targets is not None else None
            explanation = explainer.explain(
                pixels[start : start + batch_size], method=method, category_index=chosen, **method_settings.get(method, {})
            )
            chunks.append(np.asarray(explanation.masks, dtype=np.float32))
        masks[method] = np.concatenate(chunks)
        if hasattr(explanation, "settings"):
            recorded[method] = explanation.settings()
        else:
            recorded[method] = {"method": method, **method_settings.get(method, {})}
    return masks, recorded


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
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch size")
    seed = check_seed(seed)
    metrics = check_metrics(metrics)
    check_baseline(deletion_baseline, "deletion baseline")
    check_baseline(insertion_baseline, "insertion baseline")
    check_baseline(perturbation_baseline, "perturbation baseline")
    meta = explainer.metadata
    pixels, names = _inputs(explainer, inputs, names)
    count = pixels.shape[0]
    if count == 0:
        raise ValueError("no images to evaluate")
    score_fn = score_fn or session_score_fn(explainer)
    targets = expand_category_index(category_index, count, meta.num_outputs)

    clean = score_batches(score_fn, pixels, batch_size, lambda n: None)
    if meta.output_kind == "logits" and targets is None:
        targets = tuple(int(t) for t in clean.argmax(axis=1))

    masks, recorded_methods = _explain_all(explainer, pixels, methods, targets, batch_size, method_settings)
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
