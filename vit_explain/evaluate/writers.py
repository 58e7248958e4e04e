"""Write an :class:`EvaluationResult`: CSV table, JSON document, PNG plot. Every file atomically.

An evaluation can take minutes, so :func:`check_writable` lets a caller find out that the output
folder cannot be written *before* the work, and :func:`write_outputs` reports a failed write as
one :class:`~vit_explain.errors.OutputError` line naming the file, not as a traceback.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..atomic import atomic_writer, probe_writable, save_json
from ..errors import OutputError
from .metrics import METRICS
from .result import RANDOM, EvaluationResult

__all__ = ["OUTPUT_FORMATS", "check_writable", "output_paths", "save_csv", "save_result_json", "save_plot", "write_outputs"]

OUTPUT_FORMATS = ("csv", "json", "png")


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
    for ax, metric in zip(axes, result.metrics, strict=True):
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


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def output_paths(folder: str | os.PathLike, stem: str = "evaluation") -> dict[str, Path]:
    """Where :func:`write_outputs` writes, keyed by format."""
    return {fmt: Path(folder) / f"{stem}.{fmt}" for fmt in OUTPUT_FORMATS}


def check_writable(folder: str | os.PathLike, stem: str = "evaluation") -> None:
    """Raise :class:`OutputError` unless ``folder`` (created if missing) takes new files and none of
    the output names is a folder.

    The probe is :func:`vit_explain.atomic.probe_writable`, the one the explain command uses.
    """
    folder = Path(folder)
    try:
        probe_writable(folder)
    except OSError as exc:
        raise OutputError(f"cannot write in the output folder {folder}: {_reason(exc)}") from None
    for path in output_paths(folder, stem).values():
        if path.is_dir():
            raise OutputError(f"cannot write {path}: a folder is in the way")


def write_outputs(result: EvaluationResult, folder: str | os.PathLike, stem: str = "evaluation") -> dict[str, Path]:
    """``folder/evaluation.csv``, ``.json`` and ``.png``, each atomically; returns them keyed by format.

    A write that fails raises :class:`OutputError` naming the file; files already written stay.
    """
    paths = output_paths(folder, stem)
    writers = {"csv": save_csv, "json": save_result_json, "png": save_plot}
    for fmt, path in paths.items():
        try:
            writers[fmt](result, path)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
    return paths
