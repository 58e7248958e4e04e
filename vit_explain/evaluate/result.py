"""``EvaluationResult``: curves per image, metric and method, their areas, and averages.

Pure data: writing it to files is :mod:`.writers`' job (``write_outputs``), which imports this
module and never the other way round, so neither module is half-initialised when the other loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import METRICS, trapezoid_auc

__all__ = ["EvaluationResult", "RANDOM"]

#: The name of the seeded random-map baseline among the methods.
RANDOM = "random"


@dataclass(frozen=True)
class EvaluationResult:
    """Faithfulness curves for ``images`` x ``methods`` x ``metrics``.

    ``curves[metric][method]`` is ``[images, points]`` at ``fractions[metric]`` (the share of
    patches or pixels perturbed); ``top1[metric][method]`` the same for top-1 agreement with
    the clean prediction (1 or 0), or ``top1`` is None for a feature model.
    """

    images: tuple[str, ...]
    targets: tuple[int | None, ...]  # the class whose probability is scored (None: feature model)
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    score_kind: str  # "probability" (classifier) or "cosine" (feature model)
    fractions: dict[str, np.ndarray]
    curves: dict[str, dict[str, np.ndarray]]
    top1: dict[str, dict[str, np.ndarray]] | None
    clean_scores: np.ndarray  # [images]: the score of the unperturbed image
    settings: dict[str, Any] = field(default_factory=dict)
    target_names: tuple[str, ...] = ()

    # -- areas ----------------------------------------------------------------------------
    def auc(self, metric: str, method: str) -> np.ndarray:
        """Area under each image's score curve, ``[images]``."""
        return trapezoid_auc(self.fractions[metric], self.curves[metric][method])

    def top1_auc(self, metric: str, method: str) -> np.ndarray | None:
        """Area under each image's top-1 agreement curve, or None for a feature model."""
        if self.top1 is None:
            return None
        return trapezoid_auc(self.fractions[metric], self.top1[metric][method])

    def mean_curve(self, metric: str, method: str) -> np.ndarray:
        return self.curves[metric][method].mean(axis=0)

    def mean_auc(self, metric: str, method: str) -> float:
        return float(self.auc(metric, method).mean())

    def better(self, metric: str) -> str:
        return METRICS[metric].better

    # -- tables ---------------------------------------------------------------------------
    def columns(self) -> list[str]:
        cols = ["image", "target", "method"]
        for metric in self.metrics:
            cols.append(f"{metric}_auc")
            if self.top1 is not None:
                cols.append(f"{metric}_top1_auc")
        return cols

    def rows(self) -> list[dict[str, Any]]:
        """One row per image and method: the areas under its curves."""
        table = []
        areas = {(m, k): self.auc(m, k) for m in self.metrics for k in self.methods}
        top = {(m, k): self.top1_auc(m, k) for m in self.metrics for k in self.methods}
        for index, image in enumerate(self.images):
            for method in self.methods:
                row: dict[str, Any] = {"image": image, "target": self.targets[index], "method": method}
                for metric in self.metrics:
                    row[f"{metric}_auc"] = float(areas[metric, method][index])
                    if self.top1 is not None:
                        row[f"{metric}_top1_auc"] = float(top[metric, method][index])
                table.append(row)
        return table

    def averages(self) -> list[dict[str, Any]]:
        """One row per method: the areas averaged over the images (``image`` is "mean")."""
        table = []
        for method in self.methods:
            row: dict[str, Any] = {"image": "mean", "target": None, "method": method}
            for metric in self.metrics:
                row[f"{metric}_auc"] = self.mean_auc(metric, method)
                if self.top1 is not None:
                    row[f"{metric}_top1_auc"] = float(self.top1_auc(metric, method).mean())
            table.append(row)
        return table

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: settings, per-metric fractions, mean curves, averages, per image."""
        per_image = []
        for index, image in enumerate(self.images):
            entry: dict[str, Any] = {"image": image, "target": self.targets[index]}
            if self.target_names:
                entry["target_name"] = self.target_names[index]
            entry["clean_score"] = float(self.clean_scores[index])
            entry["methods"] = {}
            for method in self.methods:
                per_metric = {}
                for metric in self.metrics:
                    item = {
                        "auc": float(self.auc(metric, method)[index]),
                        "curve": self.curves[metric][method][index].tolist(),
                    }
                    if self.top1 is not None:
                        item["top1_auc"] = float(self.top1_auc(metric, method)[index])
                        item["top1_curve"] = self.top1[metric][method][index].tolist()
                    per_metric[metric] = item
                entry["methods"][method] = per_metric
            per_image.append(entry)
        return {
            "settings": self.settings,
            "score": self.score_kind,
            "methods": list(self.methods),
            "metrics": {
                metric: {
                    "fractions": self.fractions[metric].tolist(),
                    "better": METRICS[metric].better,
                    "units": METRICS[metric].units,
                    "description": METRICS[metric].title,
                }
                for metric in self.metrics
            },
            "averages": self.averages(),
            "mean_curves": {
                metric: {method: self.mean_curve(metric, method).tolist() for method in self.methods}
                for metric in self.metrics
            },
            "images": per_image,
        }
