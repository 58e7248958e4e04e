"""The questions the exporter asks of a model source, answered once per source by an adapter.

The exporter itself knows nothing of timm (or, later, Hugging Face transformers, torchvision,
Swin): it builds the model, taps its attention, reads its token layout, seed and preprocessing
through a :class:`ModelFamily`, and writes the answers into the file's metadata in a form the
runtime reads without knowing which family produced them (patch and grid size, prefix tokens,
whether rollout starts from the class token). A new source is one new adapter module, registered
in :mod:`vit_explain.families`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..eager import AttentionRecorder
from ..metadata import PreprocessConfig

__all__ = ["ModelSpec", "TokenLayout", "HeadReading", "ModelFamily"]


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked to export. ``family`` picks the adapter (:func:`~vit_explain.families.family_for`)."""

    name: str
    weights: str = "pretrained"  # "pretrained", "random" or a checkpoint path
    seed: int = 0
    img_size: tuple[int, int] | None = None  # (height, width); None keeps the model's default
    num_classes: int | None = None  # None keeps the model's default (or the checkpoint's head)
    family: str = "timm"

    @property
    def file_stem(self) -> str:
        """The default file name's stem: the model name, or a folder's or Hub id's last part."""
        if self.family == "timm":
            return self.name
        tail = self.name.split(":", 1)[1] if self.name.startswith(("hf:", "torchvision:")) else self.name
        return Path(tail.rstrip("/")).name or Path(tail).resolve().name

    @property
    def weights_label(self) -> str:
        if self.weights == "random":
            return f"random(seed={self.seed})"
        if self.weights == "pretrained":
            return "pretrained"
        return Path(self.weights).name


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of the attention maps comes from: ``num_prefix_tokens`` non-patch tokens
    (class, distillation, registers) first, then the patch grid in row-major order. This is what
    the runtime needs to turn a token row into a mask; it travels in the metadata as is."""

    image_size: tuple[int, int]  # (height, width) the model takes
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]  # patch rows x columns (floor(image / patch))
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]


@dataclass(frozen=True)
class HeadReading:
    """How the head reads the tokens, which decides where rollout starts (the seed): from the class
    token's row when the output is that token's final state, else from the mean of the patch rows;
    ``seed_weights`` for a head that reads several (one weight per prefix token, then the patch
    mean: DeiT with teacher averages class and distillation rows, DINOv2's classifier reads
    ``[CLS, mean of patches]``), see :class:`vit_explain.methods.chain.TokenLayout`."""

    pooling: str  # "token", or "avg"/"avgmax"/"max" over the patch tokens
    has_class_token: bool  # the head reads a class token (rollout seeds from its row)
    seed_weights: tuple[float, ...] | None = None  # None: from has_class_token


class ModelFamily(abc.ABC):
    """One model source. Each method answers one question; the exporter asks them in this order:
    :meth:`build` (or a model given by the caller), :meth:`check`, then the rest."""

    #: The registry key, matched against :attr:`ModelSpec.family`.
    name: str = ""

    @abc.abstractmethod
    def build(self, spec: ModelSpec) -> nn.Module:
        """The eval-mode model for ``spec``, parameters frozen; never silently random when
        weights were asked for (raise :class:`~vit_explain.errors.ExportError` instead)."""

    @abc.abstractmethod
    def check(self, model: nn.Module) -> None:
        """Refuse (ExportError) a model whose attention cannot be tapped or whose output is not
        one vector per image, before any tracing."""

    @abc.abstractmethod
    def attention_recorder(self, model: nn.Module, capture_gradients: bool = False) -> AttentionRecorder:
        """The taps: a context manager whose ``attentions`` are every layer's post-softmax
        probabilities ``[B, heads, N, N]`` in layer order, on the tensors the model really uses
        (so that their gradients are the attention gradients)."""

    @abc.abstractmethod
    def layout(self, model: nn.Module) -> TokenLayout:
        """The token layout of the attention maps."""

    @abc.abstractmethod
    def head_reading(self, model: nn.Module) -> HeadReading:
        """How the head reads the tokens (the rollout seed)."""

    @abc.abstractmethod
    def outputs(self, model: nn.Module) -> tuple[int, str]:
        """``(width, kind)`` of the output: ``kind`` "logits" (a classifier) or "features"."""

    @abc.abstractmethod
    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        """``(layers, heads, embedding width)``: the sizes the metadata and the memory estimate need."""

    @abc.abstractmethod
    def preprocess(self, model: nn.Module) -> PreprocessConfig:
        """The resize, crop and normalisation the model was trained with."""

    def class_names(self, model: nn.Module, num_outputs: int, names_file: Path | None = None) -> tuple[str, ...]:
        """Class names: from ``names_file`` (one per line, checked by the exporter), else none."""
        return ()

    def score(self, outputs: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """The scalar whose attention gradients are explained: ``sum(outputs * class_weights)``,
        a one-hot weight picking a logit (or a unit vector, a feature direction)."""
        return (outputs * class_weights).sum()

    def windows(self, model: nn.Module) -> dict | None:
        """A windowed, hierarchical model's layout (:class:`~vit_explain.windowing.WindowedLayout`
        as JSON) for the metadata; None (the default) for global attention over one token grid."""
        return None

    def pack(self, model: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
        """The per-layer attentions (or gradients) as the graph's one output: stacked
        ``[L, B, heads, N, N]`` by default; a family whose layers differ in shape packs them
        its own way (and says how in :meth:`windows`)."""
        return torch.stack(maps)

    @contextlib.contextmanager
    def traced(self, model: nn.Module, example_pixels: torch.Tensor) -> Iterator[bool]:
        """Around tracing: a family may rewrite the model so the graph does less work for the
        same outputs (the parity check compares it with the unmodified model). Yields whether it
        did; the default changes nothing."""
        yield False
