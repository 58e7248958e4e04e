"""The Hugging Face transformers model types vit-explain exports, in one table, and the wrapper
that makes such a model look like the others to the exporter.

A transformers config names its ``model_type``; :data:`HF_TYPES` says, per type, which classes
are supported and how each one's output reads the tokens (the rollout seed). Any other type
(Swin V2, CLIP, ...) is refused with one line naming the supported ones: a model type is added
here, with its parity test, or not at all.

:class:`HFVisionModel` wraps the transformers model so that ``model(pixels)`` returns one tensor
(the logits, or a feature vector for a backbone), as the exporter, the parity check and the
reference expect, and keeps what the adapter needs to know (type, class, input size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ExportError

__all__ = ["HFType", "HF_TYPES", "HFVisionModel", "hf_type_for", "supported_types"]

#: How a class's output reads the final token states:
#: "cls" the class token; "cls+dist" the average of the class and distillation heads (DeiT with
#: teacher); "cls+mean" ``[class token, mean of the patch tokens]`` (DINOv2's classifier);
#: "pooler" BEiT's pooler (the patch tokens' mean when ``use_mean_pooling``, else the class token);
#: "mean" the mean of the (last stage's) tokens (Swin's pooler).
READINGS = ("cls", "cls+dist", "cls+mean", "pooler", "mean")


@dataclass(frozen=True)
class HFType:
    """One supported transformers ``model_type``."""

    model_type: str
    backbone: str  # the feature model class (``ViTModel``): explains its class token's final state
    classifiers: dict[str, str] = field(default_factory=dict)  # class name -> reading (READINGS)
    default_processor: str = "ViTImageProcessor"  # when the folder has no preprocessor config
    distillation_token: bool = False
    register_tokens: bool = False  # config.num_register_tokens more prefix tokens
    interpolate_kwarg: bool = True  # forward takes interpolate_pos_encoding (else always interpolates)
    backbone_reading: str = "cls"

    def reading(self, class_name: str) -> str:
        return self.backbone_reading if class_name == self.backbone else self.classifiers[class_name]

    @property
    def classes(self) -> tuple[str, ...]:
        return (self.backbone, *self.classifiers)


#: The one table of supported transformers model types (Swin V2 and CLIP are refused until added).
HF_TYPES: dict[str, HFType] = {
    t.model_type: t
    for t in (
        HFType("vit", "ViTModel", {"ViTForImageClassification": "cls"}),
        HFType(
            "deit", "DeiTModel",
            {"DeiTForImageClassification": "cls", "DeiTForImageClassificationWithTeacher": "cls+dist"},
            default_processor="DeiTImageProcessor", distillation_token=True,
        ),
        HFType("beit", "BeitModel", {"BeitForImageClassification": "pooler"}, default_processor="BeitImageProcessor",
               backbone_reading="pooler"),
        HFType("dinov2", "Dinov2Model", {"Dinov2ForImageClassification": "cls+mean"},
               default_processor="BitImageProcessor", interpolate_kwarg=False),
        # windowed (shifted windows, patch merging): its own adapter, families/hf_swin.py
        HFType("swin", "SwinModel", {"SwinForImageClassification": "mean"}, backbone_reading="mean"),
        HFType("dinov2_with_registers", "Dinov2WithRegistersModel",
               {"Dinov2WithRegistersForImageClassification": "cls+mean"},
               default_processor="BitImageProcessor", register_tokens=True, interpolate_kwarg=False),
    )
}


def supported_types() -> str:
    return ", ".join(sorted(HF_TYPES))


def hf_type_for(model_type: str, class_name: str | None = None) -> HFType:
    """The table's entry for ``model_type`` (and the check that it supports ``class_name``)."""
    entry = HF_TYPES.get(model_type)
    if entry is None:
        raise ExportError(
            f"transformers model type {model_type!r} is not supported (supported: {supported_types()})"
        )
    if class_name is not None and class_name not in entry.classes:
        raise ExportError(
            f"{class_name} is not supported (for model type {model_type!r}: {', '.join(entry.classes)})"
        )
    return entry


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class HFVisionModel(nn.Module):
    """A transformers vision model whose call returns one tensor per image: the logits of a
    classifier, or for a backbone the feature vector its head would read (the class token's
    final, normalised state; BEiT with mean pooling: its pooler output, the patch tokens' mean).

    ``image_size`` (height, width) is the input the export takes; when it is not the config's,
    the position embeddings are interpolated (``interpolate_pos_encoding``), as transformers does.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.class_name = type(model).__name__
        self.hf_type = hf_type_for(config.model_type, self.class_name)
        self.config_size = _pair(config.image_size)
        self.image_size = tuple(image_size) if image_size is not None else self.config_size
        self.patch_size = _pair(config.patch_size)

    @property
    def reading(self) -> str:
        reading = self.hf_type.reading(self.class_name)
        if reading == "pooler":  # BEiT: the pooler averages the patch tokens when so configured
            mean = bool(getattr(self.model.config, "use_mean_pooling", False))
            has_pooler = getattr(self.model, "pooler", None) is not None or self.class_name != self.hf_type.backbone
            return "mean" if mean and has_pooler else "cls"
        return reading

    @property
    def num_prefix_tokens(self) -> int:
        config = self.model.config
        registers = int(getattr(config, "num_register_tokens", 0) or 0) if self.hf_type.register_tokens else 0
        return 1 + int(self.hf_type.distillation_token) + registers

    @property
    def is_classifier(self) -> bool:
        return self.class_name != self.hf_type.backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.image_size != self.config_size and self.hf_type.interpolate_kwarg:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, **kwargs)
        if self.is_classifier:
            return out.logits
        if self.reading == "mean":
            return out.pooler_output
        return out.last_hidden_state[:, 0]
