"""The adapter for Hugging Face transformers Vision Transformers (ViT, DeiT, BEiT, DINOv2, DINOv2
with registers; the table is :mod:`.hf_types`).

Sources: a folder written by ``save_pretrained`` (recognised by its ``config.json``) or a Hub id
(``hf:org/name``; offline that is one :class:`WeightsUnavailableError` line, never a random
model). ``--weights random`` builds the config's architecture with seeded random weights (tests),
a file path loads a state dict into it.

Attention: transformers' SDPA attention returns no probabilities, and its eager attention is a
function no hook can reach. The model is loaded with :func:`tapped_eager_attention` registered as
its attention implementation: transformers' own eager maths (scores, mask or BEiT's relative
position bias, softmax, dropout), whose probabilities go through the active recorder's tap
before they multiply the values, so the tapped tensor is the one the output depends on.
transformers is imported only here, when a model is exported: the ``[hf]`` extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..eager.taps import ProbabilityTaps
from ..errors import ExportError, WeightsUnavailableError, first_line
from ..metadata import PreprocessConfig
from .base import HeadReading, ModelFamily, ModelSpec, TokenLayout
from .hf_preprocess import preprocess_from_processor
from .hf_types import HFVisionModel, hf_type_for
from .timm_vit import _offline_when_hub_unreachable

__all__ = ["ATTENTION_NAME", "HFTransformers", "HFTaps", "tapped_eager_attention", "wrap_hf_model", "hub_id"]

#: The attention implementation name registered with transformers' ``AttentionInterface``.
ATTENTION_NAME = "vit_explain_eager"
_ACTIVE: contextvars.ContextVar[ProbabilityTaps | None] = contextvars.ContextVar("vit_explain_hf_taps", default=None)
_log = logging.getLogger("vit_explain.export")


def tapped_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_kwargs):
    """transformers' ``eager_attention_forward`` (ViT, DeiT, BEiT, DINOv2), with the active
    recorder's tap on the probabilities the values are multiplied by."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # BEiT passes its relative position bias here
        scores = scores + attention_mask
    # transformers' softmax runs in float32 (half-precision models); float64 stays float64 here,
    # so that a float64 finite-difference check of the gradient is not float32 noise.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    taps = _ACTIVE.get()
    if taps is not None:
        probabilities = taps.tap(probabilities)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, tapped_eager_attention)


class HFTaps(ProbabilityTaps):
    """Makes :func:`tapped_eager_attention` record into this recorder while it is entered."""

    def __init__(self, capture_gradients: bool = False) -> None:
        super().__init__(capture_gradients)
        self._token: contextvars.Token | None = None

    def _install(self) -> None:
        self._token = _ACTIVE.set(self)

    def _remove(self) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None


def hub_id(name: str) -> str | None:
    """``hf:org/name`` -> ``org/name``; None for anything else."""
    return name[3:] if name.startswith("hf:") else None


def _source(spec: ModelSpec) -> str:
    """Where transformers loads from: the folder, or the Hub id."""
    return hub_id(spec.name) or spec.name


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _load_config(spec: ModelSpec):
    from transformers import AutoConfig

    source = _source(spec)
    if hub_id(spec.name) is None and not (Path(source) / "config.json").is_file():
        raise ExportError(f"{source} is not a transformers model folder (no config.json; save_pretrained writes one)")
    try:
        with _offline_when_hub_unreachable():
            return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if hub_id(spec.name) is not None:
            raise WeightsUnavailableError(
                f"{spec.name} could not be loaded from the Hugging Face Hub ({first_line(exc)}). Without network "
                "access, save the model with save_pretrained where it is available and export that folder: "
                "vit-explain export ./FOLDER"
            ) from None
        raise ExportError(f"cannot read the transformers config in {source}: {first_line(exc)}") from None


def _class_name(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    entry = hf_type_for(config.model_type)
    name = architectures[0] if architectures else entry.backbone
    hf_type_for(config.model_type, name)
    return name


def _build(spec: ModelSpec) -> nn.Module:
    import transformers

    _quiet_transformers()
    _register_attention()
    config = _load_config(spec)
    cls = getattr(transformers, _class_name(config))
    if spec.num_classes is not None:
        raise ExportError("--num-classes does not apply to a transformers model: the config says how many classes")
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        model = cls._from_config(config, attn_implementation=ATTENTION_NAME)
    else:
        try:
            with _offline_when_hub_unreachable():
                model = cls.from_pretrained(_source(spec), attn_implementation=ATTENTION_NAME)
        except (OSError, ValueError) as exc:
            if hub_id(spec.name) is not None:
                raise WeightsUnavailableError(f"{spec.name}: weights could not be loaded ({first_line(exc)})") from None
            raise ExportError(f"cannot load the weights in {spec.name}: {first_line(exc)}") from None
        if spec.weights != "pretrained":
            _load_state_dict(model, Path(spec.weights))
    return model


def _load_state_dict(model: nn.Module, path: Path) -> None:
    """A local state dict (``.safetensors`` or ``.pth``) into the config's architecture, strictly."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any reader or shape failure means "does not fit"
        raise ExportError(f"checkpoint {path.name} does not fit {type(model).__name__}: {first_line(exc)}") from None


def wrap_hf_model(model: nn.Module, img_size: tuple[int, int] | None = None) -> HFVisionModel:
    """A transformers model (built by the caller, e.g. a test) made exportable: the tapped
    attention selected, frozen, eval mode, wrapped to return one tensor."""
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    wrapped = HFVisionModel(model, img_size)
    for parameter in wrapped.parameters():
        parameter.requires_grad_(False)
    return wrapped.eval()


def _processor(source: str, model: HFVisionModel):
    """The folder's (or Hub model's) image processor, or the type's default one with a notice."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        with _offline_when_hub_unreachable():
            return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        name = model.hf_type.default_processor
        _log.info("note: no image processor config in %s: using %s's defaults", source, name)
        return getattr(transformers, name)()


class HFTransformers(ModelFamily):
    """transformers ViT-likes, wrapped in :class:`HFVisionModel`."""

    name = "hf"

    def build(self, spec: ModelSpec) -> nn.Module:
        try:
            model = _build(spec)
        except ImportError as exc:
            missing = f"{exc.name} is missing"
            raise ExportError(f'exporting a transformers model needs transformers ({missing}): pip install -e ".[hf]"') from None
        wrapped = wrap_hf_model(model, spec.img_size)
        wrapped.source = _source(spec)
        return wrapped

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, HFVisionModel):
            raise ExportError(f"{type(model).__name__} is not a wrapped transformers model (use wrap_hf_model)")
        if model.model.config._attn_implementation != ATTENTION_NAME:
            raise ExportError("the transformers model does not run the tapped eager attention (use wrap_hf_model)")
        height, width = model.image_size
        with HFTaps() as taps, torch.no_grad():
            model(torch.zeros(1, 3, height, width))
        layers = int(model.model.config.num_hidden_layers)
        if len(taps.attentions) != layers:
            raise ExportError(
                f"{model.class_name}: {len(taps.attentions)} attention maps tapped for {layers} layers "
                "(an attention transformers does not run through its attention interface?)"
            )

    def attention_recorder(self, model: nn.Module, capture_gradients: bool = False) -> HFTaps:
        return HFTaps(capture_gradients)

    def layout(self, model: nn.Module) -> TokenLayout:
        height, width = model.image_size
        patch_h, patch_w = model.patch_size
        return TokenLayout(
            image_size=(height, width),
            patch_size=(patch_h, patch_w),
            grid_size=(height // patch_h, width // patch_w),
            num_prefix_tokens=model.num_prefix_tokens,
        )

    def head_reading(self, model: nn.Module) -> HeadReading:
        prefix = model.num_prefix_tokens
        reading = model.reading
        if reading == "mean":
            return HeadReading(pooling="avg", has_class_token=False)
        if reading == "cls":
            return HeadReading(pooling="token", has_class_token=True)
        weights = [0.0] * (prefix + 1)
        if reading == "cls+dist":  # the average of the class and distillation heads
            weights[0] = weights[1] = 0.5
            return HeadReading(pooling="token", has_class_token=True, seed_weights=tuple(weights))
        weights[0] = weights[-1] = 0.5  # "cls+mean": [class token, mean of patch tokens]
        return HeadReading(pooling="token+avg", has_class_token=True, seed_weights=tuple(weights))

    def outputs(self, model: nn.Module) -> tuple[int, str]:
        config = model.model.config
        if model.is_classifier:
            return int(config.num_labels), "logits"
        return int(config.hidden_size), "features"

    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        config = model.model.config
        return int(config.num_hidden_layers), int(config.num_attention_heads), int(config.hidden_size)

    def preprocess(self, model: nn.Module) -> PreprocessConfig:
        source = getattr(model, "source", None) or getattr(model.model, "name_or_path", "")
        return preprocess_from_processor(_processor(str(source), model), model.image_size)

    @contextlib.contextmanager
    def traced(self, model: nn.Module, example_pixels: torch.Tensor) -> Iterator[bool]:
        """BEiT caches its relative position index by window size, hashing the size; traced with
        a symbolic input that size is symbolic and cannot be hashed, so while tracing the cache
        is asked with plain ints (the input size is fixed; the values are the same)."""
        patched = []
        for module in model.modules():
            generate = getattr(type(module), "generate_relative_position_index", None)
            if generate is not None:
                module.generate_relative_position_index = lambda size, g=generate: g((int(size[0]), int(size[1])))
                patched.append(module)
        try:
            yield False
        finally:
            for module in patched:
                del module.generate_relative_position_index

    def class_names(self, model: nn.Module, num_outputs: int, names_file: Path | None = None) -> tuple[str, ...]:
        """From ``names_file``, else the config's ``id2label`` (none when it holds only
        transformers' placeholder ``LABEL_i`` names)."""
        if names_file is not None:
            from .timm_vit import class_names_for

            return class_names_for(model, num_outputs, names_file)
        id2label = {int(k): str(v) for k, v in (getattr(model.model.config, "id2label", None) or {}).items()}
        names = tuple(id2label.get(i, "") for i in range(num_outputs))
        if not all(names) or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
            return ()
        return names
