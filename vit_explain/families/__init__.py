"""Model sources the exporter can read (export side: needs torch), one adapter module each.

An adapter (:class:`~.base.ModelFamily`) answers the questions the exporter asks: how to build
the model, where its attention probabilities are tapped, its token layout (prefix tokens, grid;
later windows and merges), how its head reads the tokens (the rollout seed), its score and its
preprocessing. Adding a source (Hugging Face transformers, torchvision, Swin) is one module with
one adapter class, registered in :data:`FAMILIES`; the exporter and the runtime stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ExportError
from .base import HeadReading, ModelFamily, ModelSpec, TokenLayout
from .hf_swin import HF_SWIN, is_hf_swin
from .hf_vit import HFTransformers
from .timm_swin import SWIN, timm_family_for
from .timm_vit import TimmViT
from .torchvision_vit import TorchvisionViT

__all__ = [
    "FAMILIES", "HeadReading", "ModelFamily", "ModelSpec", "TokenLayout", "build_model", "family_for", "family_of_source",
]

#: Adapters by :attr:`ModelSpec.family`.
FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (TimmViT(), SWIN, HFTransformers(), HF_SWIN, TorchvisionViT())
}


def family_for(spec: ModelSpec, model: nn.Module | None = None) -> ModelFamily:
    """The adapter ``spec`` names; refused with the known ones otherwise. With the built
    ``model``, timm's and transformers' adapter is the one for its architecture (Swin v1, or
    the ViT one; other windowed timm models are refused with the reason)."""
    family = FAMILIES.get(spec.family)
    if family is None:
        raise ExportError(f"unknown model family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})")
    if model is not None and spec.family == "timm":
        family = timm_family_for(model, family)
    elif model is not None and spec.family == "hf" and is_hf_swin(model):
        family = HF_SWIN
    return family


def family_of_source(source: str) -> str:
    """Which family a ``vit-explain export`` source names: ``hf:ID`` (a transformers model on the
    Hub), ``torchvision:NAME``, a folder with a ``config.json`` (written by ``save_pretrained``),
    else a timm model name. A folder without ``config.json`` is refused, not taken for a name."""
    if source.startswith("hf:"):
        return "hf"
    if source.startswith("torchvision:"):
        return "torchvision"
    folder = Path(source)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ExportError(f"{source} is a folder without config.json: export a folder written by save_pretrained")
        return "hf"
    return "timm"


def build_model(spec: ModelSpec) -> nn.Module:
    """The eval-mode model for ``spec``, built by its family's adapter."""
    return family_for(spec).build(spec)
