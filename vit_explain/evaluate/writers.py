"""Write an :class:`EvaluationResult`: CSV table, JSON document, PNG plot. Every file atomically."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..outputs.files import atomic_writer, save_json
from .metrics import METRICS
from .result import RANDOM, EvaluationResult

__all__ = ["save_csv", "save_result_json", "save_plot", "write_outputs"]


def save_csv(result: EvaluationResult, path: str | os.PathLike) -> None:
    """One row per image and method, then one ``image=mean`` row per method (averages)."""
    with atomic_writer(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=result.columns(), lineterminator="\n")
        writer.writeheader()
        for row in result.rows() + result.averages():
            writer.writerow({k: ("" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)) for k, v in row.items()})


def save_result_json(result: EvaluationResult, path: str | os.PathLike) -> None:
    save_json(path, result.to_dict())


def save_plot(result: EvaluationResult, path: str | os.PathLike, dpi: int = 110) -> None:
    """Mean curve per method, one panel per metric; the legend shows each mean area.

    Uses a bare :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no GUI
    backend, safe in threads and on servers).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = len(result.metrics)
    figure = Figure(figsize=(4.2 * panels, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    label = "target probability" if result.score_kind == "probability" else "cosine similarity to clean features"
    for ax, metric in zip(axes, result.metrics):
        spec = METRICS[metric]
        x = result.fractions[metric]
        for method in result.methods:
            style = {"linestyle": "--", "color": "0.5"} if method == RANDOM else {}
            area = result.mean_auc(metric, method)
            ax.plot(x, result.mean_curve(metric, method), marker=".", label=f"{method} ({area:.3f})", **style)
        ax.set_title(f"{metric} ({spec.better} AUC is better)", fontsize=10)
        ax.set_xlabel(f"fraction of {spec.units} {'revealed' if spec.start == 'baseline' else 'perturbed'}")
        ax.set_ylabel(label)
        ax.set_xlim(0, float(x[-1]) if len(x) and x[-1] > 0 else 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="method (AUC)", title_fontsize=8)
    figure.suptitle(f"Faithfulness over {len(result.images)} image(s)", fontsize=11)
    with atomic_writer(path, "wb") as f:
        figure.savefig(f, format="png", dpi=dpi)


def write_outputs(result: EvaluationResult, folder: str | os.PathLike, stem: str = "evaluation") -> dict[str, Path]:
    """``folder/evaluation.csv``, ``.json`` and ``.png``; returns them keyed by format."""
    folder = Path(folder)
    paths = {fmt: folder / f"{stem}.{fmt}" for fmt in ("csv", "json", "png")}
    save_csv(result, paths["csv"])
    save_result_json(result, paths["json"])
    save_plot(result, paths["png"])
    return paths
