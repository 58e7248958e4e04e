"""What vit-explain writes: overlays placed where the model looked, safe files, reports.

Pure numpy + Pillow (+ matplotlib's colormap registry): no torch, no onnxruntime. The atomic
writers live in :mod:`vit_explain.atomic` (the exporter shares them) and are re-exported here;
finding the input images is :mod:`vit_explain.discovery`'s job.
"""

from __future__ import annotations

from ..atomic import atomic_write_bytes, atomic_writer, save_json, save_npy, save_png
from .contact_sheet import render_contact_sheet, write_contact_sheet
from .naming import output_stem
from .overlay import available_colormaps, colorize, overlay, upsample_mask
from .placement import Placement, grid_box, model_box, place_mask
from .report import ReportContext, ReportEntry, render_html_report, write_html_report

__all__ = [
    "Placement",
    "ReportContext",
    "ReportEntry",
    "atomic_write_bytes",
    "atomic_writer",
    "available_colormaps",
    "colorize",
    "grid_box",
    "model_box",
    "output_stem",
    "overlay",
    "place_mask",
    "render_contact_sheet",
    "render_html_report",
    "save_json",
    "save_npy",
    "save_png",
    "upsample_mask",
    "write_contact_sheet",
    "write_html_report",
]
