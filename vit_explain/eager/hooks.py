"""Taps on an eager model's attention probabilities (and their gradients), for export and reference.

The exporter traces through these hooks and the reference records through them, so the graph
and the yardstick it is checked against read the very same tensors: every attention module's
``attn_drop`` output (post-softmax), with timm's fused attention switched off, since
``F.scaled_dot_product_attention`` never calls ``attn_drop``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["attention_modules", "AttentionRecorder"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules whose probabilities pass through ``attn_drop``, in block order.

    Any timm attention with a ``fused_attn`` switch and an ``attn_drop`` module qualifies
    (ViT/DeiT ``Attention``, EVA and BEiT attention). The caller checks the count against
    ``len(model.blocks)``.
    """
    found = []
    for module in model.modules():
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
            found.append(module)
    return found


class AttentionRecorder(contextlib.AbstractContextManager):
    """Records every layer's post-softmax attention probabilities during a forward pass.

    Used as a context manager: fused attention is turned off for its duration (and restored
    after), and hooks are removed on exit, so a model is never left modified. ``attentions``
    is emptied by :meth:`reset`, which callers invoke before each forward pass.
    """

    def __init__(self, model: nn.Module, capture_gradients: bool = False) -> None:
        self.model = model
        self.capture_gradients = capture_gradients
        self.modules = attention_modules(model)
        self.attentions: list[torch.Tensor] = []
        self.gradients: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fused_before: list[bool] = []

    def __enter__(self) -> AttentionRecorder:
        self._fused_before = [bool(m.fused_attn) for m in self.modules]
        for module in self.modules:
            module.fused_attn = False
            self._handles.append(module.attn_drop.register_forward_hook(self._on_attention))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, fused in zip(self.modules, self._fused_before, strict=False):
            module.fused_attn = fused

    def reset(self) -> None:
        self.attentions = []
        self.gradients = {}

    def _on_attention(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        layer = len(self.attentions)
        self.attentions.append(output)
        if self.capture_gradients and output.requires_grad:
            # The hook holds the dict, not the recorder: a hook lives in the tensor's C++ autograd
            # data, out of the garbage collector's sight, so tensor -> hook -> recorder -> tensor
            # would never be freed (every layer's attention and gradient leaked on each call).
            gradients = self.gradients

            def store(grad: torch.Tensor, layer: int = layer) -> None:
                gradients[layer] = grad

            output.register_hook(store)
