"""The PyTorch reference: eager timm + hooks, written the plain way, with the original tool's bugs fixed.

It is the yardstick the parity tests and ``export``'s check measure the ONNX engine against,
so it deliberately computes things the straightforward (slow) way:

* attention probabilities are captured by :class:`vit_explain.eager.AttentionRecorder`'s forward
  hooks on every block's ``attn_drop`` (the exporter traces through the same hooks), appended in
  call order, which is layer order;
* gradients are captured with ``Tensor.register_hook`` on those very tensors, stored by layer
  index (backward runs last layer first: the original paired them the wrong way round), after
  the softmax (the legacy ``register_backward_hook`` saw pre-softmax gradients);
* rollout multiplies the full ``N x N`` matrices, discards per batch item (not item 0 only),
  normalises rows with ``keepdim`` and keeps no state between calls.

The engine (``vit_explain.runtime.rollout``) computes only the class-token row instead, so the
two share no maths code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .eager import AttentionRecorder, reads_class_token

__all__ = ["ReferenceOutputs", "TorchReference", "torch_rollout", "one_hot"]


@dataclass
class ReferenceOutputs:
    logits: torch.Tensor  # [B, C]
    attentions: torch.Tensor  # [L, B, heads, N, N]
    gradients: torch.Tensor | None  # [L, B, heads, N, N]


def _fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.max(dim=1).values
    if head_fusion == "min":
        return attention.min(dim=1).values
    raise ValueError(f"unknown head fusion {head_fusion!r}")


def torch_rollout(
    attentions: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor] | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
) -> torch.Tensor:
    """Rollout with the full ``N x N`` product, as the original tool did (defects fixed).

    Returns the raw (unscaled) relevance of the patch tokens, ``[B, num_patches]``.
    With gradients, each layer's map is ``clamp(fuse(A * G), min=0)`` (gradient rollout).
    """
    batch, _, tokens, _ = attentions[0].shape
    eye = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device)
    result = eye.expand(batch, tokens, tokens).clone()
    with torch.no_grad():
        for layer, attention in enumerate(attentions):
            attention = attention.double()
            if gradients is not None:
                fused = _fuse_heads(attention * gradients[layer].double(), head_fusion).clamp(min=0)
            else:
                fused = _fuse_heads(attention, head_fusion)
            flat = fused.reshape(batch, -1).clone()
            drop = int(flat.shape[-1] * discard_ratio)
            if drop > 0:
                for item in range(batch):
                    _, lowest = flat[item].topk(drop, largest=False)
                    lowest = lowest[lowest != 0]  # never the class token's own attention
                    flat[item, lowest] = 0
            fused = flat.reshape(batch, tokens, tokens)
            a = (fused + eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
    if has_class_token:
        row = result[:, 0, num_prefix_tokens:]
    else:  # no class token: the mean of the patch tokens' rows
        row = result[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)
    return row.float()


class TorchReference:
    """Eager-model attentions, gradients and rollout masks for a timm Vision Transformer."""

    def __init__(self, model: nn.Module, pack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack) -> None:
        """``pack``: how the layers' maps become one tensor, as the exported graph returns them
        (stacked; a windowed family packs its differently shaped blocks per image)."""
        self.model = model.eval()
        self.pack = pack
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.has_class_token = reads_class_token(model)
        self.grid_size = tuple(model.patch_embed.grid_size)

    def outputs(self, pixel_values: torch.Tensor, class_weights: torch.Tensor | None = None) -> ReferenceOutputs:
        """Logits and attentions, plus d(sum(logits * class_weights))/d(attention) when weights are given."""
        want_grad = class_weights is not None
        with AttentionRecorder(self.model, capture_gradients=want_grad) as recorder:
            recorder.reset()
            if not want_grad:
                with torch.no_grad():
                    logits = self.model(pixel_values)
                return ReferenceOutputs(logits, self.pack(list(recorder.attentions)), None)
            with torch.enable_grad():
                pixels = pixel_values.detach().clone().requires_grad_(True)
                logits = self.model(pixels)
                score = (logits * class_weights).sum()
                self.model.zero_grad(set_to_none=True)
                score.backward()
            layers = len(recorder.attentions)
            gradients = self.pack([recorder.gradients[i] for i in range(layers)])
            return ReferenceOutputs(
                logits.detach(), self.pack(list(recorder.attentions)).detach(), gradients.detach()
            )

    def masks(
        self,
        pixel_values: torch.Tensor,
        method: str = "rollout",
        head_fusion: str = "max",
        discard_ratio: float = 0.9,
        category_index: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Masks ``[B, grid_h, grid_w]`` scaled to max 1, for ``rollout`` or ``grad_rollout``."""
        if method == "rollout":
            out = self.outputs(pixel_values)
            row = torch_rollout(
                list(out.attentions), None, head_fusion, discard_ratio,
                self.num_prefix_tokens, self.has_class_token,
            )
        elif method == "grad_rollout":
            if category_index is None:
                raise ValueError("grad_rollout needs category_index")
            weights = one_hot(category_index, pixel_values.shape[0], self.num_outputs(pixel_values)).to(pixel_values.device)
            out = self.outputs(pixel_values, weights)
            row = torch_rollout(
                list(out.attentions), list(out.gradients), head_fusion, discard_ratio,
                self.num_prefix_tokens, self.has_class_token,
            )
        else:
            raise ValueError(f"unknown method {method!r}")
        peak = row.max(dim=-1, keepdim=True).values
        row = torch.where(peak > 0, row / torch.where(peak > 0, peak, 1), torch.zeros_like(row))
        return row.reshape(row.shape[0], *self.grid_size)

    def num_outputs(self, pixel_values: torch.Tensor) -> int:
        num = getattr(self.model, "num_classes", 0)
        if num:
            return int(num)
        return int(self.model.num_features)


def one_hot(category_index: Sequence[int], batch: int, num_outputs: int) -> torch.Tensor:
    indices = list(category_index)
    if len(indices) == 1 and batch > 1:
        indices = indices * batch
    weights = torch.zeros(batch, num_outputs)
    weights[torch.arange(batch), torch.tensor(indices)] = 1.0
    return weights
