"""Argument checks shared by :func:`~vit_explain.evaluate.evaluate` and ``evaluate_masks``:
a wrong setting is one ValueError naming it before minutes of forward passes, not a numpy
error from deep inside the curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import METRIC_NAMES, METRICS
from .perturbation import BASELINES

__all__ = ["check_baseline", "check_metrics", "check_positive_int", "check_seed"]


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def check_seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, not {value!r}")
    return int(value)


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics asked for, once each, in order (a single name is allowed)."""
    metrics = tuple(dict.fromkeys([metrics] if isinstance(metrics, str) else metrics))
    if not metrics:
        raise ValueError("no metric asked for")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRIC_NAMES)}, not {metric!r}")
    return metrics


def check_baseline(kind: str, name: str) -> str:
    if kind not in BASELINES:
        raise ValueError(f"{name} must be one of {', '.join(BASELINES)}, not {kind!r}")
    return kind
