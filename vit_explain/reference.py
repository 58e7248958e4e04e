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

The engine (``vit_explain.methods``) computes only the seed's row instead, so the two share no
maths code but the seed's weights (:func:`~vit_explain.methods.chain.seed_weights_for`, which
says which rows to read, not how to compute them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .families import FAMILIES, ModelFamily
from .methods.chain import seed_weights_for

__all__ = ["ReferenceOutputs", "TorchReference", "torch_rollout", "torch_gae", "torch_attention", "read_seed", "one_hot"]


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
    seed_weights: tuple[float, ...] | None = None,
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
    return read_seed(result, num_prefix_tokens, has_class_token, seed_weights).float()


def read_seed(
    relevance: torch.Tensor, num_prefix_tokens: int, has_class_token: bool = True,
    seed_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """The seed's row of a full ``[B, N, N]`` relevance matrix over the patch tokens, the long
    way: the weighted sum of the prefix tokens' rows and of the mean of the patch tokens' rows
    (the class row alone, or the patch mean alone, without ``seed_weights``)."""
    weights = seed_weights_for(num_prefix_tokens, has_class_token, seed_weights)
    patches = relevance[:, :, num_prefix_tokens:]
    terms = [weight * patches[:, token] for token, weight in enumerate(weights[:-1]) if weight]
    if weights[-1]:
        terms.append(weights[-1] * patches[:, num_prefix_tokens:].mean(dim=1))
    return torch.stack(terms).sum(dim=0)


def torch_gae(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], num_prefix_tokens: int,
    has_class_token: bool = True, seed_weights: tuple[float, ...] | None = None, start_layer: int = 0,
) -> torch.Tensor:
    """GAE (Chefer et al. 2021) the long way: ``R = I``, ``R <- R + mean_heads(max(G * A, 0)) @ R``
    per layer from ``start_layer`` on; the seed's row of ``R`` over the patches, float64."""
    batch, _, tokens, _ = attentions[0].shape
    relevance = torch.eye(tokens, dtype=torch.float64).expand(batch, tokens, tokens).clone()
    for attention, gradient in list(zip(attentions, gradients, strict=True))[start_layer:]:
        cam = (attention.double() * gradient.double()).clamp(min=0).mean(dim=1)
        relevance = relevance + cam @ relevance
    return read_seed(relevance, num_prefix_tokens, has_class_token, seed_weights)


def torch_attention(
    attentions: Sequence[torch.Tensor], head_fusion: str, num_prefix_tokens: int,
    has_class_token: bool = True, seed_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Last-layer attention, heads fused: the seed's row of it over the patches, float64."""
    return read_seed(_fuse_heads(attentions[-1].double(), head_fusion), num_prefix_tokens, has_class_token, seed_weights)


class TorchReference:
    """Eager-model attentions, gradients and rollout masks for a Vision Transformer of any
    family (timm by default): its taps, token layout and seed come from the family's adapter."""

    def __init__(self, model: nn.Module, family: ModelFamily | None = None) -> None:
        self.model = model.eval()
        self.family = family or FAMILIES["timm"]
        layout, reading = self.family.layout(model), self.family.head_reading(model)
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.has_class_token = reading.has_class_token
        self.seed_weights = reading.seed_weights
        self.grid_size = tuple(layout.grid_size)

    def outputs(self, pixel_values: torch.Tensor, class_weights: torch.Tensor | None = None) -> ReferenceOutputs:
        """Logits and attentions, plus d(sum(logits * class_weights))/d(attention) when weights are given."""
        want_grad = class_weights is not None
        with self.family.attention_recorder(self.model, capture_gradients=want_grad) as recorder:
            recorder.reset()
            if not want_grad:
                with torch.no_grad():
                    logits = self.model(pixel_values)
                return ReferenceOutputs(logits, self.family.pack(self.model, list(recorder.attentions)), None)
            with torch.enable_grad():
                pixels = pixel_values.detach().clone().requires_grad_(True)
                logits = self.model(pixels)
                score = (logits * class_weights).sum()
                self.model.zero_grad(set_to_none=True)
                score.backward()
            layers = len(recorder.attentions)
            gradients = self.family.pack(self.model, [recorder.gradients[i] for i in range(layers)])
            return ReferenceOutputs(
                logits.detach(), self.family.pack(self.model, list(recorder.attentions)).detach(), gradients.detach()
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
                self.num_prefix_tokens, self.has_class_token, self.seed_weights,
            )
        elif method == "grad_rollout":
            if category_index is None:
                raise ValueError("grad_rollout needs category_index")
            weights = one_hot(category_index, pixel_values.shape[0], self.num_outputs(pixel_values)).to(pixel_values.device)
            out = self.outputs(pixel_values, weights)
            row = torch_rollout(
                list(out.attentions), list(out.gradients), head_fusion, discard_ratio,
                self.num_prefix_tokens, self.has_class_token, self.seed_weights,
            )
        else:
            raise ValueError(f"unknown method {method!r}")
        peak = row.max(dim=-1, keepdim=True).values
        row = torch.where(peak > 0, row / torch.where(peak > 0, peak, 1), torch.zeros_like(row))
        return row.reshape(row.shape[0], *self.grid_size)

    def num_outputs(self, pixel_values: torch.Tensor) -> int:
        return int(self.family.outputs(self.model)[0])


def one_hot(category_index: Sequence[int], batch: int, num_outputs: int) -> torch.Tensor:
    indices = list(category_index)
    if len(indices) == 1 and batch > 1:
        indices = indices * batch
    weights = torch.zeros(batch, num_outputs)
    weights[torch.arange(batch), torch.tensor(indices)] = 1.0
    return weights
