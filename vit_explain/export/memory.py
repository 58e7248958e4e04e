"""How much memory an export needs, and how much there is: refuse before the work, not by the kernel.

The export's peak is its parity check (:mod:`.verify`): the eager reference and onnxruntime each
hold every layer's attention probabilities and their gradients, ``layers x heads x tokens^2``
floats per image and kind, which grows with the fourth power of the input side (a ViT-S/14 at its
native 518 px: ~540 MB per image and kind). The constants below are measured, not derived: a
DINOv2 ViT-S/14 export at 518 px peaked at 4.9 GB with the check's attention term at ~6.5 times one
image's attention array; the estimate rounds up so that an export it lets through fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ModelShape",
    "attention_bytes",
    "check_batch_size",
    "estimate_export_bytes",
    "available_memory_bytes",
]

_FLOAT = 4
#: Python, torch, timm, onnx and onnxruntime loaded, before any model (measured ~0.8 GB).
_LIBRARIES_BYTES = 1.0 * 1024**3
#: Copies of the weights alive at the peak: the model, the ONNX proto, its serialized form and
#: onnxruntime's session.
_WEIGHT_COPIES = 4
#: Attention-sized arrays (one image, one kind) alive at the check's peak: the reference's
#: recorded and stacked attentions and gradients, then onnxruntime's per-layer tensors, their
#: stacked outputs and the reference's outputs held for the comparison (measured ~6.5).
_ATTENTION_COPIES = 7
#: Token-sized arrays (``tokens x width``) per layer kept for the backward pass, in both engines.
_TOKEN_COPIES = 24
#: The check runs its two probe images as one piece (which also checks that the graph keeps batch
#: items apart) while their attentions are this small; above, one image at a time.
_PAIR_LIMIT_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class ModelShape:
    """What the export's memory depends on."""

    layers: int
    heads: int
    tokens: int  # prefix + patch tokens
    width: int
    parameter_bytes: int
    #: Attention values per image over all layers, where it is not ``layers x heads x tokens^2``
    #: (a windowed model: each block's windows only).
    attention_values: int | None = None


def attention_bytes(shape: ModelShape, images: int = 1) -> int:
    """Bytes of every layer's attention probabilities (or their gradients) for ``images`` images."""
    if shape.attention_values is not None:
        return images * shape.attention_values * _FLOAT
    return shape.layers * images * shape.heads * shape.tokens**2 * _FLOAT


def check_batch_size(shape: ModelShape, probe_images: int = 2) -> int:
    """Images per piece of the parity check: all of them while that is cheap, else one."""
    return probe_images if attention_bytes(shape, probe_images) <= _PAIR_LIMIT_BYTES else 1


def estimate_export_bytes(shape: ModelShape) -> int:
    """Peak resident memory of an export of ``shape``, rounded up (see the module docstring)."""
    batch = check_batch_size(shape)
    tokens = _TOKEN_COPIES * shape.layers * batch * shape.tokens * shape.width * _FLOAT
    return int(
        _LIBRARIES_BYTES
        + _WEIGHT_COPIES * shape.parameter_bytes
        + _ATTENTION_COPIES * attention_bytes(shape, batch)
        + tokens
    )


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Room left under a cgroup v2 memory limit (a container's), which /proc/meminfo does not show."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int | None:
    """Memory this process can still take without swapping or being killed, ``None`` when unknown."""
    found = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)
