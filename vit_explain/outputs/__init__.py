"""What vit-explain writes: overlays, safe files, input discovery, reports.

Pure numpy + Pillow (+ matplotlib's colormap registry): no torch, no onnxruntime.
"""

from __future__ import annotations

from .files import (
    InputImage,
    atomic_write_bytes,
    atomic_writer,
    discover_images,
    looks_like_image,
    output_stem,
    save_json,
    save_npy,
    save_png,
    sniff_image,
)
from .overlay import available_colormaps, colorize, overlay, upsample_mask
from .placement import Placement, grid_box, model_box, place_mask
from .report import (
    ReportEntry,
    render_contact_sheet,
    render_html_report,
    write_contact_sheet,
    write_html_report,
)

__all__ = [
    "InputImage",
    "Placement",
    "ReportEntry",
    "atomic_write_bytes",
    "atomic_writer",
    "available_colormaps",
    "colorize",
    "discover_images",
    "grid_box",
    "looks_like_image",
    "model_box",
    "output_stem",
    "overlay",
    "place_mask",
    "render_contact_sheet",
    "render_html_report",
    "save_json",
    "save_npy",
    "save_png",
    "sniff_image",
    "upsample_mask",
    "write_contact_sheet",
    "write_html_report",
]
