"""The adapter for timm's ViT-like models (ViT, DeiT, DINOv2, BEiT, EVA, ...).

Building (pretrained, random with a seed, or a local checkpoint through timm's own filter and
position-embedding resampling), the attention taps (every attention module's ``attn_drop``, with
fused attention off), the token layout from ``patch_embed``, the seed from ``global_pool`` and
the class token, the preprocessing from timm's data config, and ImageNet class names.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch import nn

from ..eager import AttentionRecorder, attention_modules, pooling_of, reads_class_token
from ..errors import ExportError, WeightsUnavailableError, first_line
from ..metadata import PreprocessConfig
from .base import HeadReading, ModelFamily, ModelSpec, TokenLayout
from .timm_last_block import head_tokens_only

__all__ = ["TimmViT", "build_model", "closest_model_names", "class_names_for"]


def _create(spec: ModelSpec, pretrained: bool, **overrides) -> nn.Module:
    kwargs: dict = dict(overrides)
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = closest_model_names(spec.name)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ExportError(f"unknown timm model {spec.name!r}{hint}") from None
        raise


def closest_model_names(name: str, count: int = 5) -> list[str]:
    """timm's model names most like ``name``, closest first: a typo (``deit_tiny_patch16_244``)
    differs in a character or two, which a shared prefix alone does not rank."""
    import difflib

    architecture = name.split(".", 1)[0]  # a pretrained tag (".fb_in1k") is not part of the name
    return difflib.get_close_matches(architecture, timm.list_models(), n=count, cutoff=0.6)


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a local state dict the way timm does: its checkpoint filter and position-embedding resampling."""
    if not path.is_file():
        raise ExportError(f"checkpoint file not found: {path}")
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a checkpoint"
        raise ExportError(f"cannot read checkpoint {path}: {exc}") from None
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (RuntimeError, ValueError, KeyError) as exc:  # e.g. a position grid that cannot be resampled
            raise ExportError(
                f"checkpoint {path.name} does not fit {type(model).__name__}: {first_line(exc)} "
                "(check the model name, --num-classes and --img-size)"
            ) from None
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when not strict
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        detail = "; ".join(mismatches[:3]) or str(exc).splitlines()[0]
        raise ExportError(
            f"checkpoint {path.name} does not fit {type(model).__name__}: {detail} "
            "(check the model name, --num-classes and --img-size)"
        ) from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {_first(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {_first(result.unexpected_keys)}")
    if problems:
        raise ExportError(
            f"checkpoint {path.name} does not fit {type(model).__name__}: {'; '.join(problems)} "
            "(check the model name, --num-classes and --img-size)"
        )


def _first(keys: list[str], count: int = 4) -> str:
    shown = ", ".join(keys[:count])
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return f"[{shown}{more}]"


@contextlib.contextmanager
def _offline_when_hub_unreachable(host: str = "huggingface.co") -> Iterator[None]:
    """Use huggingface_hub's offline mode when its host does not even resolve.

    Without network, the hub client retries with back-off for about a minute before failing;
    offline mode still loads weights from the local cache and fails at once otherwise.
    """
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        pass
    else:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def build_model(spec: ModelSpec) -> nn.Module:
    """The eval-mode timm model for ``spec``; never silently random when weights were asked for."""
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        model = _create(spec, pretrained=False)
    elif spec.weights == "pretrained":
        try:
            with _offline_when_hub_unreachable():
                model = _create(spec, pretrained=True)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub, network and cache errors all mean "not available"
            raise WeightsUnavailableError(
                f"pretrained weights for {spec.name} could not be loaded ({type(exc).__name__}: {first_line(exc)}). "
                "Without network access, pass a local state dict with --weights PATH "
                "(or --weights random for a test model)"
            ) from None
    else:
        model = _create(spec, pretrained=False)
        _load_checkpoint(model, Path(spec.weights))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def class_names_for(model: nn.Module, num_outputs: int, names_file: Path | None = None) -> tuple[str, ...]:
    """Class names: from ``names_file`` (one per line), else timm's ImageNet names when they fit."""
    if names_file is not None:
        names = [line.strip() for line in Path(names_file).read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        if len(names) != num_outputs:
            raise ExportError(
                f"{names_file} has {len(names)} class names but the model has {num_outputs} classes"
            )
        return tuple(names)
    if not getattr(model, "num_classes", 0):
        return ()
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return ()
        info = ImageNetInfo(subset)
        if info.num_classes() != num_outputs:
            return ()
        return tuple(info.index_to_description(i) for i in range(num_outputs))
    except Exception:  # noqa: BLE001 - names are a convenience, never a reason to fail an export
        return ()


def _averages_distillation_head(model: nn.Module, pooling: str) -> bool:
    """timm's distilled DeiT (``VisionTransformerDistilled``) averages its class and distillation
    heads in eval mode, unless it was set to return both for distillation training."""
    return (
        pooling == "token"
        and isinstance(getattr(model, "head_dist", None), nn.Module)
        and not getattr(model, "distilled_training", False)
        and int(getattr(model, "num_prefix_tokens", 0)) >= 2
    )


def _unsupported(model: nn.Module, reason: str) -> ExportError:
    return ExportError(f"{type(model).__name__} is not supported yet: {reason}")


class TimmViT(ModelFamily):
    """timm Vision Transformers with ``blocks``, a ``patch_embed`` and tappable attention."""

    name = "timm"

    def build(self, spec: ModelSpec) -> nn.Module:
        return build_model(spec)

    def check(self, model: nn.Module) -> None:
        blocks = getattr(model, "blocks", None)
        patch_embed = getattr(model, "patch_embed", None)
        if blocks is None or patch_embed is None or not hasattr(patch_embed, "grid_size"):
            raise _unsupported(model, "not a Vision Transformer with blocks and a patch embedding")
        if getattr(model, "dynamic_img_size", False):
            raise _unsupported(model, "dynamic image size; export with a fixed --img-size instead")
        attentions = attention_modules(model)
        unfusable = [m for m in model.modules() if hasattr(m, "fused_attn") and not isinstance(getattr(m, "attn_drop", None), nn.Module)]
        if unfusable:
            raise _unsupported(model, f"{type(unfusable[0]).__name__} (an attention-pooling head?) has no attn_drop to tap")
        pooling = pooling_of(model)
        if pooling not in ("token", "avg", "avgmax", "max"):
            raise _unsupported(model, f"global_pool={pooling!r} (the output must be one vector per image)")
        if len(attentions) != len(blocks):
            raise _unsupported(
                model,
                f"found {len(attentions)} tappable attention modules for {len(blocks)} blocks "
                "(an attention-pooling head or an attention timm cannot run unfused)",
            )

    def attention_recorder(self, model: nn.Module, capture_gradients: bool = False) -> AttentionRecorder:
        return AttentionRecorder(model, capture_gradients)

    def layout(self, model: nn.Module) -> TokenLayout:
        patch_embed = model.patch_embed
        prefix = getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
        return TokenLayout(
            image_size=tuple(int(v) for v in patch_embed.img_size),
            patch_size=tuple(int(v) for v in patch_embed.patch_size),
            grid_size=tuple(int(v) for v in patch_embed.grid_size),
            num_prefix_tokens=int(prefix),
        )

    def head_reading(self, model: nn.Module) -> HeadReading:
        pooling = pooling_of(model)
        if _averages_distillation_head(model, pooling):
            # Distilled DeiT at inference: (head(class token) + head_dist(distillation token)) / 2.
            weights = [0.0] * (int(model.num_prefix_tokens) + 1)
            weights[0] = weights[1] = 0.5
            return HeadReading(pooling=pooling, has_class_token=True, seed_weights=tuple(weights))
        return HeadReading(pooling=pooling, has_class_token=reads_class_token(model))

    def outputs(self, model: nn.Module) -> tuple[int, str]:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        return (num_classes, "logits") if num_classes else (int(model.num_features), "features")

    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        width = int(getattr(model, "embed_dim", 0) or model.num_features)
        return len(model.blocks), int(attention_modules(model)[0].num_heads), width

    def preprocess(self, model: nn.Module) -> PreprocessConfig:
        from timm.data import resolve_model_data_config

        data = resolve_model_data_config(model)
        height, width = self.layout(model).image_size
        return PreprocessConfig(
            input_size=(3, height, width),
            interpolation=str(data.get("interpolation") or "bicubic"),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop_pct=float(data.get("crop_pct") or 0.875),
            crop_mode=str(data.get("crop_mode") or "center"),
        )

    def class_names(self, model: nn.Module, num_outputs: int, names_file: Path | None = None) -> tuple[str, ...]:
        return class_names_for(model, num_outputs, names_file)

    def traced(self, model: nn.Module, example_pixels: torch.Tensor):
        """The last block on the head's tokens only (:mod:`.timm_last_block`)."""
        return head_tokens_only(model, example_pixels)
