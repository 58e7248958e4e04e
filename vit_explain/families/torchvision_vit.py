"""The adapter for torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``,
``vit_l_32``, ``vit_h_14``): ``vit-explain export torchvision:vit_b_16 --weights PATH|DEFAULT``.

torchvision's ``EncoderBlock`` calls ``nn.MultiheadAttention(x, x, x, need_weights=False)``: no
probabilities come back, and asked for them (``need_weights=True``) the module returns an
average over heads computed beside the output, not a tensor the output depends on, so its
gradient would be no attention gradient. While a recorder is entered, each block's attention
module runs :func:`tapped_self_attention` instead: the same maths written out (input projection,
scaled scores, softmax, the values weighted by the probabilities the tap returns, output
projection), so the tapped tensor is the one the output is made from (tests check the gradient
against finite differences, and the logits against the untouched module's).

Preprocessing is the weights' own eval transform (``weights.transforms()``: resize the short
side, centre crop, mean/std); a local state dict gets the architecture's DEFAULT weights' one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..eager.taps import ProbabilityTaps
from ..errors import ExportError, WeightsUnavailableError, first_line
from ..metadata import PreprocessConfig
from .base import HeadReading, ModelFamily, ModelSpec, TokenLayout
from .hf_preprocess import RESAMPLE_NAMES

__all__ = ["TorchvisionViT", "TorchvisionTaps", "tapped_self_attention", "ARCHITECTURES"]

ARCHITECTURES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


def tapped_self_attention(attention: nn.MultiheadAttention, taps: ProbabilityTaps, query: torch.Tensor, *_args, **_kwargs):
    """``nn.MultiheadAttention(x, x, x)`` (batch first, self-attention, no mask, as torchvision's
    blocks call it) written out, with ``taps.tap`` on the probabilities the values are weighted by."""
    batch, tokens, width = query.shape
    heads = attention.num_heads
    head_dim = width // heads
    qkv = nn.functional.linear(query, attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(q * head_dim**-0.5, k.transpose(-2, -1))
    probabilities = nn.functional.softmax(scores, dim=-1)
    probabilities = nn.functional.dropout(probabilities, p=attention.dropout, training=attention.training)
    probabilities = taps.tap(probabilities)
    output = torch.matmul(probabilities, v).transpose(1, 2).reshape(batch, tokens, width)
    return nn.functional.linear(output, attention.out_proj.weight, attention.out_proj.bias), None


def _attentions(model: nn.Module) -> list[nn.MultiheadAttention]:
    layers = getattr(getattr(model, "encoder", None), "layers", None) or []
    return [block.self_attention for block in layers if isinstance(getattr(block, "self_attention", None), nn.MultiheadAttention)]


class TorchvisionTaps(ProbabilityTaps):
    """Runs :func:`tapped_self_attention` in every block while entered (an instance ``forward``,
    removed on exit: the model is left as it was)."""

    def __init__(self, model: nn.Module, capture_gradients: bool = False) -> None:
        super().__init__(capture_gradients)
        self.modules = _attentions(model)

    def _install(self) -> None:
        for attention in self.modules:
            attention.forward = functools.partial(tapped_self_attention, attention, self)

    def _remove(self) -> None:
        for attention in self.modules:
            vars(attention).pop("forward", None)


def _architecture(spec: ModelSpec) -> str:
    name = spec.name.split(":", 1)[1] if spec.name.startswith("torchvision:") else spec.name
    if name not in ARCHITECTURES:
        raise ExportError(f"unknown torchvision Vision Transformer {name!r} (supported: {', '.join(ARCHITECTURES)})")
    return name


def _load_state_dict(model: nn.Module, path: Path) -> None:
    """A local state dict, its position embeddings resampled (torchvision's own
    ``interpolate_embeddings``) when the model's input size differs."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any reader or shape failure means "does not fit"
        raise ExportError(
            f"checkpoint {path.name} does not fit torchvision's {type(model).__name__}: {first_line(exc)}"
        ) from None


def build_torchvision(spec: ModelSpec) -> nn.Module:
    """The eval-mode torchvision ViT for ``spec``; never silently random when weights were asked for."""
    import torchvision

    name = _architecture(spec)
    kwargs: dict = {}
    if spec.img_size is not None:
        if spec.img_size[0] != spec.img_size[1]:
            raise ExportError("torchvision's VisionTransformer takes square images only: --img-size N")
        kwargs["image_size"] = spec.img_size[0]
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.weights == "pretrained":
        if kwargs:
            raise ExportError("--img-size and --num-classes need --weights PATH or random with torchvision's DEFAULT weights")
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as exc:  # noqa: BLE001 - download, network and cache errors all mean "not available"
            raise WeightsUnavailableError(
                f"torchvision's DEFAULT weights for {name} could not be loaded ({type(exc).__name__}: {first_line(exc)}). "
                "Without network access, pass a local state dict with --weights PATH"
            ) from None
    else:
        torch.manual_seed(spec.seed)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if spec.weights != "random":
            _load_state_dict(model, Path(spec.weights))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.arch_name = name
    return model.eval()


class TorchvisionViT(ModelFamily):
    """torchvision ``VisionTransformer``: class token, ``heads`` read its final state."""

    name = "torchvision"

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_torchvision(spec)

    def check(self, model: nn.Module) -> None:
        from torchvision.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ExportError(f"{type(model).__name__} is not torchvision's VisionTransformer")
        if len(_attentions(model)) != len(model.encoder.layers):
            raise ExportError("a torchvision encoder block without nn.MultiheadAttention self_attention cannot be tapped")

    def attention_recorder(self, model: nn.Module, capture_gradients: bool = False) -> TorchvisionTaps:
        return TorchvisionTaps(model, capture_gradients)

    def layout(self, model: nn.Module) -> TokenLayout:
        size, patch = int(model.image_size), int(model.patch_size)
        return TokenLayout((size, size), (patch, patch), (size // patch, size // patch), num_prefix_tokens=1)

    def head_reading(self, model: nn.Module) -> HeadReading:
        return HeadReading(pooling="token", has_class_token=True)

    def outputs(self, model: nn.Module) -> tuple[int, str]:
        linear = [m for m in model.heads.modules() if isinstance(m, nn.Linear)]
        if linear:
            return int(linear[-1].out_features), "logits"
        return int(model.hidden_dim), "features"

    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        return len(model.encoder.layers), int(_attentions(model)[0].num_heads), int(model.hidden_dim)

    def preprocess(self, model: nn.Module) -> PreprocessConfig:
        """The DEFAULT weights' eval transform (short side, centre crop), scaled to the input size."""
        import torchvision

        transform = torchvision.models.get_model_weights(getattr(model, "arch_name", "vit_b_16")).DEFAULT.transforms()
        crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
        size = int(model.image_size)
        interpolation = str(getattr(transform.interpolation, "value", transform.interpolation)).lower()
        if interpolation not in RESAMPLE_NAMES.values():
            raise ExportError(f"torchvision interpolation {interpolation!r} is not one the runtime reproduces")
        config = PreprocessConfig(
            input_size=(3, size, size),
            interpolation=interpolation,
            mean=tuple(float(v) for v in transform.mean),
            std=tuple(float(v) for v in transform.std),
            crop_pct=1.0,
            crop_mode="center",
            resize_size=(max(size, round(resize * size / crop)),),
        )
        config.check()
        return config

    def class_names(self, model: nn.Module, num_outputs: int, names_file: Path | None = None) -> tuple[str, ...]:
        """From ``names_file``, else the DEFAULT weights' ImageNet categories when they fit."""
        if names_file is not None:
            from .timm_vit import class_names_for

            return class_names_for(model, num_outputs, names_file)
        import torchvision

        weights = torchvision.models.get_model_weights(getattr(model, "arch_name", "vit_b_16")).DEFAULT
        categories = tuple(weights.meta.get("categories") or ())
        return categories if len(categories) == num_outputs else ()
