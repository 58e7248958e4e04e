"""Small random timm Vision Transformers made testable, and the families the suite exports.

Random initialisation makes timm's attention almost uniform (every probability ~1/N). Uniform
attention hides maths bugs: a wrong row normalisation, a reversed layer order or a gradient paired
with the wrong layer all give nearly the same mask when every matrix is ~``J/N``. So before export
each model is made "testable": biases, class/register tokens, layer-scale factors and relative
position tables get non-trivial values (timm initialises many of them to zero or ~1e-6, which also
creates exact ties between tokens), and the query/key projections are scaled up so attention is
peaky. ``tests/parity/test_parity.py`` asserts that the result really is far from uniform.

Plain functions and data, not fixtures, so tests can import them (``FAMILIES``) as well as use
them through the fixtures in ``tests/conftest.py``. torch and timm are imported lazily: the
runtime tests import this module where torch is blocked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


# --------------------------------------------------------------------------- #
# Making random models testable
# --------------------------------------------------------------------------- #


def _query_key_projections(attention: nn.Module) -> list[tuple[torch.Tensor, slice]]:
    """(tensor, rows) pairs holding the query and key projections of one attention module.

    timm stores them three ways: a fused ``qkv`` Linear whose first ``2 * dim`` output rows are
    q and k (ViT, DeiT, BEiT, EVA), optionally with separate ``q_bias`` (BEiT, EVA: the key has
    no bias), or separate ``q_proj`` / ``k_proj`` Linears (EVA with ``qkv_fused=False``).
    """
    import torch
    from torch import nn

    found: list[tuple[torch.Tensor, slice]] = []
    qkv = getattr(attention, "qkv", None)
    if isinstance(qkv, nn.Linear):
        rows = slice(0, 2 * (qkv.out_features // 3))
        found.append((qkv.weight, rows))
        if qkv.bias is not None:
            found.append((qkv.bias, rows))
    for name in ("q_proj", "k_proj"):
        projection = getattr(attention, name, None)
        if isinstance(projection, nn.Linear):
            found.append((projection.weight, slice(None)))
            if projection.bias is not None:
                found.append((projection.bias, slice(None)))
    q_bias = getattr(attention, "q_bias", None)
    if isinstance(q_bias, torch.Tensor):
        found.append((q_bias, slice(None)))
    if not found:
        raise TypeError(f"no query/key projection found on {type(attention).__name__}")
    return found


def sharpen_attention(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every layer's query and key projections by ``factor`` (logits by ``factor**2``).

    Attention logits are ``q . k``, so this makes the softmax peakier without changing which
    keys a query prefers; values and everything else are untouched. In place; returns ``model``.
    """
    import torch

    from vit_explain.eager import attention_modules

    with torch.no_grad():
        for attention in attention_modules(model):
            for tensor, rows in _query_key_projections(attention):
                tensor[rows] *= factor
    return model


def randomize_untrained_parameters(model: nn.Module, seed: int, head_gain: float = 3.0) -> nn.Module:
    """Give the parameters timm initialises to constants random, non-trivial values. In place.

    * biases (timm: zeros) so a dropped bias term would show in the parity check;
    * class, distillation and register tokens (timm: ~1e-6 or zeros) so prefix tokens differ
      from each other: identical tokens create exactly tied attention values, and the discard
      step then has no well-defined answer;
    * layer-scale factors (DINOv2 init: 1e-5) to O(1), otherwise every block is almost the
      identity and layer L sees the same input as layer 1, which would hide a layer-order bug;
    * BEiT's relative position bias tables (zeros) so the bias is actually exercised;
    * classifier heads (std 0.02, or 0.02 * 0.001 for BEiT/EVA) to logits of a few units, as in a
      trained model: gradient rollout adds ``A * G`` to the identity, so with tiny gradients every
      layer is ~I and the mask is ~uniform whatever the maths does.
    """
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)

    def noise(tensor: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator) * scale

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("cls_token", "dist_token", "reg_token"):
                parameter.copy_(noise(parameter, 0.5))
            elif leaf == "relative_position_bias_table":
                parameter.copy_(noise(parameter, 0.5))
            elif leaf in ("gamma", "gamma_1", "gamma_2"):  # layer scale (timm LayerScale, BEiT)
                parameter.copy_(0.5 + 0.5 * torch.rand(parameter.shape, generator=generator))
            elif name in ("head.weight", "head_dist.weight", "head.fc.weight"):  # head.fc: Swin
                parameter.copy_(noise(parameter, head_gain / parameter.shape[1] ** 0.5))
            elif leaf.endswith("bias"):  # bias, q_bias, v_bias
                parameter.add_(noise(parameter, 0.05))
    return model


# --------------------------------------------------------------------------- #
# The families under test
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Family:
    """One small timm model configuration to export; ``key`` is the pytest id."""

    key: str
    name: str
    create_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    sharpen: float = 4.0  # chosen per family: mean max-probability ~8-15x uniform, max < 0.99
    head_gain: float = 3.0  # classifier weights ~ gain / sqrt(width): logits of a few units

    def build(self) -> nn.Module:
        import timm
        import torch

        torch.manual_seed(self.seed)
        model = timm.create_model(self.name, pretrained=False, **self.create_kwargs)
        randomize_untrained_parameters(model, self.seed, self.head_gain)
        sharpen_attention(model, self.sharpen)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval()


FAMILIES: dict[str, Family] = {
    family.key: family
    for family in (
        # class token, 14x14 grid, 3 layers
        Family("deit", "deit_tiny_patch16_224", dict(depth=3), seed=0),
        # a second seed, 7x7 grid
        Family("deit-seed1", "deit_tiny_patch16_224", dict(depth=2, img_size=112), seed=1),
        # non-square 6x8 grid, class + distillation token
        Family("deit-distilled", "deit_tiny_distilled_patch16_224", dict(depth=2, img_size=(96, 128)), seed=2),
        # feature model (no head), class + 4 register tokens, layer scale
        Family("dinov2-reg4", "vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=98, num_classes=0), seed=3,
               sharpen=3.0),
        # no class token: the mask is the mean of the patch rows. Mean pooling also averages the
        # gradient over all patches, so a larger head is needed for gradient rollout to move
        # away from the uniform start vector.
        Family("vit-gap", "vit_medium_patch16_gap_256", dict(depth=2, img_size=96), seed=4, sharpen=3.0,
               head_gain=20.0),
        # BEiT (q/v biases, relative position bias) and EVA-02 (rotary embeddings, SwiGLU) pool the
        # patch tokens by default (global_pool="avg"), so their class token never reaches the
        # output and gradient rollout from the class row is ~0 (see tests/parity/test_parity.py::
        # test_rollout_of_an_average_pooled_model_starts_from_the_pooled_tokens). The parity
        # tests read the class token instead; the attention is the same either way.
        Family("beit", "beit_base_patch16_224", dict(depth=2, embed_dim=192, num_heads=3, global_pool="token"),
               seed=5),
        Family("eva02", "eva02_tiny_patch14_224", dict(depth=2, img_size=112, num_classes=10, global_pool="token"),
               seed=6),
    )
}


@dataclass
class ExportedModel:
    """An exported family: the ONNX file, the eager model it came from, and the export result."""

    family: Family
    path: Path
    model: nn.Module
    result: Any  # vit_explain.export.ExportResult

    @property
    def metadata(self):
        return self.result.metadata
