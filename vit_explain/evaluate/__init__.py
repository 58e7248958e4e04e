"""Faithfulness metrics for the explanation methods: deletion / insertion curves (RISE) and
positive / negative perturbation (Chefer et al.), with a seeded random-map baseline.

Torch-free: the perturbed images are scored by the exported graph's forward-only pass in
onnxruntime (or any injected ``score_fn``).

>>> from vit_explain.runtime import Explainer
>>> from vit_explain.evaluate import evaluate, write_outputs
>>> result = evaluate(Explainer("model.onnx"), ["cat.jpg", "dog.jpg"], methods=["rollout", "gae"])
>>> result.averages()      # mean AUC per method and metric
>>> write_outputs(result, "eval-out")   # evaluation.csv / .json / .png
"""

from .curves import DEFAULT_BATCH_SIZE, DEFAULT_STEPS, ScoreFn, evaluate_masks
from .metrics import METRIC_NAMES, METRICS, MetricSpec, cosine_similarity, trapezoid_auc
from .perturbation import BASELINES
from .result import RANDOM, EvaluationResult
from .runner import evaluate, session_score_fn
from .writers import check_writable, save_csv, save_plot, save_result_json, write_outputs

__all__ = [
    "BASELINES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_STEPS",
    "METRICS",
    "METRIC_NAMES",
    "MetricSpec",
    "RANDOM",
    "EvaluationResult",
    "ScoreFn",
    "check_writable",
    "cosine_similarity",
    "evaluate",
    "evaluate_masks",
    "save_csv",
    "save_plot",
    "save_result_json",
    "session_score_fn",
    "trapezoid_auc",
    "write_outputs",
]
