"""The faithfulness metrics: what each one perturbs, in which order, and how a curve is scored.

* ``deletion`` (Petsiuk et al., RISE, 2018): remove the most relevant *patches* first (they
  become the baseline), in ``steps`` equal steps from none to all; a faithful map makes the
  target score fall fast, so a **lower** area under the curve is better.
* ``insertion`` (RISE): start from the baseline image (blurred by default) and reveal the most
  relevant patches first; a faithful map makes the score rise fast: **higher** is better.
* ``positive`` (Chefer et al., CVPR 2021): the patch map is upsampled bilinearly to pixels and
  the most relevant 0%, 10%, .., 90% of *pixels* are set to the baseline: **lower** is better.
* ``negative`` (Chefer et al.): the same, least relevant pixels first: **higher** is better.

The score is the target class's softmax probability (top-1 prediction of the clean image unless
a category is given) for a classifier, and the cosine similarity of the output features to the
clean image's features for a model without a classifier head. For a classifier, the top-1
agreement (perturbed prediction == clean prediction) is recorded as a second curve.

Areas are trapezoids over the fraction actually perturbed (0..1 for deletion and insertion,
0..0.9 for the perturbation tests), including the unperturbed point at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MetricSpec", "METRICS", "METRIC_NAMES", "trapezoid_auc", "cosine_similarity"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    units: str  # "patches" or "pixels": what is ranked and perturbed
    start: str  # "clean": the clean image loses units; "baseline": the baseline image gains them
    first: str  # "most" or "least": which units change first
    better: str  # "lower" or "higher" area under the curve
    title: str

    @property
    def baseline_setting(self) -> str:
        """The :func:`~vit_explain.evaluate.evaluate` argument that chooses this metric's baseline."""
        return {"deletion": "deletion_baseline", "insertion": "insertion_baseline"}.get(self.name, "perturbation_baseline")


METRICS: dict[str, MetricSpec] = {
    "deletion": MetricSpec("deletion", "patches", "clean", "most", "lower", "Deletion (most relevant patches removed first)"),
    "insertion": MetricSpec("insertion", "patches", "baseline", "most", "higher", "Insertion (most relevant patches revealed first)"),
    "positive": MetricSpec("positive", "pixels", "clean", "most", "lower", "Positive perturbation (most relevant pixels removed)"),
    "negative": MetricSpec("negative", "pixels", "clean", "least", "higher", "Negative perturbation (least relevant pixels removed)"),
}
METRIC_NAMES = tuple(METRICS)


def trapezoid_auc(fractions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Trapezoid area under ``scores`` (``[..., points]``) over ``fractions`` (``[points]``)."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    if y.shape[-1] != x.shape[0]:
        raise ValueError(f"{y.shape[-1]} scores for {x.shape[0]} fractions")
    if x.shape[0] < 2:
        return np.zeros(y.shape[:-1])
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x)).sum(axis=-1) / 2.0


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; 0 where either vector is zero (never NaN)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(axis=-1)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
