"""Small random Hugging Face transformers ViTs, made testable and saved as ``save_pretrained``
folders, the way a user holds a fine-tuned model.

Like ``tests/helpers/models.py`` for timm: random init makes attention almost uniform and sets
tokens, biases and layer scales to constants, which would hide maths bugs, so before saving each
model gets non-trivial prefix tokens, biases and layer scales, a classifier with logits of a few
units, and query/key projections scaled up (peaky attention). Each family also saves an image
processor config, so export reads its preprocessing from the folder as it would a real one.

torch and transformers are imported lazily: the runtime tests import this module without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def _randomize(model: nn.Module, seed: int, head_gain: float) -> None:
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)

    def noise(tensor, scale: float):
        return torch.randn(tensor.shape, generator=generator) * scale

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("cls_token", "distillation_token", "register_tokens", "relative_position_bias_table"):
                parameter.copy_(noise(parameter, 0.5))
            elif leaf in ("lambda1", "lambda_1", "lambda_2"):  # layer scale
                parameter.copy_(0.5 + 0.5 * torch.rand(parameter.shape, generator=generator))
            elif leaf == "weight" and "classifier" in name:
                parameter.copy_(noise(parameter, head_gain / parameter.shape[1] ** 0.5))
            elif leaf == "bias":
                parameter.add_(noise(parameter, 0.05))


def _sharpen(model: nn.Module, factor: float) -> None:
    """Scale every query and key projection (weights and biases) by ``factor``."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                parameter.mul_(factor)


@dataclass(frozen=True)
class HFFamily:
    """One small transformers model to save and export; ``key`` is the pytest id."""

    key: str
    config_class: str
    model_class: str
    config: dict
    processor_class: str
    processor: dict
    seed: int = 0
    sharpen: float = 9.0  # HF inits q/k with std 0.02: x9 gives a mean max-probability ~7-10x uniform
    head_gain: float = 3.0
    img_size: tuple[int, int] | None = None  # export at another input size (position embeddings interpolated)
    expected_seed: tuple[float, ...] | None = None  # the metadata's seed_weights
    expected_has_class_token: bool = True
    labels: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The raw transformers model, random, testable, eval mode."""
        import torch
        import transformers

        config = dict(self.config)
        if self.labels:
            config["id2label"] = dict(enumerate(self.labels))
            config["label2id"] = {name: i for i, name in enumerate(self.labels)}
        torch.manual_seed(self.seed)
        model = getattr(transformers, self.model_class)(getattr(transformers, self.config_class)(**config))
        _randomize(model, self.seed, self.head_gain)
        _sharpen(model, self.sharpen)
        return model.eval()

    def save(self, folder: Path) -> Path:
        """``save_pretrained`` the model and its image processor into ``folder``."""
        import transformers

        self.build().save_pretrained(folder)
        getattr(transformers, self.processor_class)(**self.processor).save_pretrained(folder)
        return folder


_SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, patch_size=8)
_IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

HF_FAMILIES: dict[str, HFFamily] = {
    f.key: f
    for f in (
        # class token; exact resize (a non-square photo is stretched); class names from id2label
        HFFamily("hf-vit", "ViTConfig", "ViTForImageClassification", dict(_SMALL, image_size=48, num_labels=6),
                 "ViTImageProcessor", dict(size={"height": 48, "width": 48}), seed=11,
                 labels=("cat", "dog", "bird", "plane", "car", "ship")),
        # backbone, exported at a non-square size other than the config's (interpolated positions)
        HFFamily("hf-vit-backbone", "ViTConfig", "ViTModel", dict(_SMALL, image_size=48),
                 "ViTImageProcessor", dict(size={"height": 40, "width": 56}), seed=12, img_size=(40, 56)),
        # class + distillation tokens, logits the average of both heads: seed (0.5, 0.5, 0)
        HFFamily("hf-deit-teacher", "DeiTConfig", "DeiTForImageClassificationWithTeacher",
                 dict(_SMALL, image_size=48, num_labels=7), "DeiTImageProcessor",
                 dict(size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48}, resample=3), seed=13,
                 expected_seed=(0.5, 0.5, 0.0)),
        HFFamily("hf-deit", "DeiTConfig", "DeiTForImageClassification", dict(_SMALL, image_size=40, num_labels=5),
                 "DeiTImageProcessor", dict(size={"height": 46, "width": 46}, crop_size={"height": 40, "width": 40}),
                 seed=14),
        # mean pooling (the class token never reaches the head), relative position bias, layer scale
        HFFamily("hf-beit", "BeitConfig", "BeitForImageClassification",
                 dict(_SMALL, image_size=40, num_labels=5, use_mean_pooling=True, use_relative_position_bias=True,
                      layer_scale_init_value=0.5),
                 "BeitImageProcessor", dict(size={"height": 40, "width": 40}, do_center_crop=False), seed=15,
                 head_gain=20.0, expected_has_class_token=False),
        # head reads [CLS, mean of patches]: seed (0.5, 0.5); shortest-edge resize + crop
        HFFamily("hf-dinov2", "Dinov2Config", "Dinov2ForImageClassification",
                 dict(_SMALL, patch_size=7, image_size=42, num_labels=6), "BitImageProcessor",
                 dict(size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42}, **_IMAGENET), seed=16,
                 expected_seed=(0.5, 0.5)),
        # 1 class + 2 register tokens, backbone (features)
        HFFamily("hf-dinov2-reg", "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                 dict(_SMALL, patch_size=7, image_size=35, num_register_tokens=2), "BitImageProcessor",
                 dict(size={"shortest_edge": 40}, crop_size={"height": 35, "width": 35}, **_IMAGENET), seed=17,
                 ),
        HFFamily("hf-dinov2-reg-classifier", "Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                 dict(_SMALL, patch_size=7, image_size=35, num_register_tokens=2, num_labels=4), "BitImageProcessor",
                 dict(size={"shortest_edge": 40}, crop_size={"height": 35, "width": 35}, **_IMAGENET), seed=18,
                 expected_seed=(0.5, 0.0, 0.0, 0.5)),
    )
}

#: The families the quick subset (-m "not slow") exports: the two new seeds.
QUICK_HF_FAMILIES = ("hf-deit-teacher", "hf-dinov2")
