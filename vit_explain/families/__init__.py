"""Model sources the exporter can read (export side: needs torch), one adapter module each.

An adapter (:class:`~.base.ModelFamily`) answers the questions the exporter asks: how to build
the model, where its attention probabilities are tapped, its token layout (prefix tokens, grid;
later windows and merges), how its head reads the tokens (the rollout seed), its score and its
preprocessing. Adding a source (Hugging Face transformers, torchvision, Swin) is one module with
one adapter class, registered in :data:`FAMILIES`; the exporter and the runtime stay as they are.
"""

from __future__ import annotations

from torch import nn

from ..errors import ExportError
from .base import HeadReading, ModelFamily, ModelSpec, TokenLayout
from .timm_swin import SWIN, timm_family_for
from .timm_vit import TimmViT

__all__ = ["FAMILIES", "HeadReading", "ModelFamily", "ModelSpec", "TokenLayout", "build_model", "family_for"]

#: Adapters by :attr:`ModelSpec.family`.
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (TimmViT(), SWIN)}


def family_for(spec: ModelSpec, model: nn.Module | None = None) -> ModelFamily:
    """The adapter ``spec`` names; refused with the known ones otherwise. With the built
    ``model``, timm's adapter is the one for its architecture (Swin v1, or the ViT one; other
    windowed models are refused with the reason)."""
    family = FAMILIES.get(spec.family)
    if family is None:
        raise ExportError(f"unknown model family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})")
    if model is not None and spec.family == "timm":
        family = timm_family_for(model, family)
    return family


def build_model(spec: ModelSpec) -> nn.Module:
    """The eval-mode model for ``spec``, built by its family's adapter."""
    return family_for(spec).build(spec)
