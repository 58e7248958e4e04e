"""The methods' maths: each is a seed row and one map per block, through :func:`.chain.propagate`.

``rollout`` (Abnar & Zuidema 2020) and ``grad_rollout`` (as in the original vit-explain), per
layer ``l``:

1. fuse the heads (mean, min or max) of ``A_l`` (rollout) or of ``A_l * G_l`` clamped at 0
   afterwards (gradient rollout);
2. zero the lowest ``int(N * N * discard_ratio)`` entries of the fused ``N x N`` map, except the
   class token's attention to itself (flat index 0) when it is among them;
3. ``a_l = (fused + I) / 2`` with each row divided by its own sum (the residual connection);
4. ``R = a_L @ ... @ a_1``; the mask is the class token's row of ``R`` over the patch tokens,
   computed as ``e_cls @ a_L @ ... @ a_1``.

``gae`` (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability"): ``R = I`` and,
for each layer in forward order, ``Abar_l = mean_heads(max(G_l * A_l, 0))`` (clamped per head,
then averaged) and ``R <- R + Abar_l @ R``. Unrolled, ``R = (I + Abar_L) ... (I + Abar_1)``, so
the class row is ``e_cls @ (I + Abar_L) @ ... @ (I + Abar_1)``: again last layer first, each step
``row <- row + row @ Abar_l``. No discard ratio, no row normalisation, no head-fusion choice.

``attention``: the last layer's attention, heads fused (mean by default), class row over the
patches. A baseline with no propagation through layers.

``start_layer = K`` (rollout, grad_rollout, gae) leaves out the first ``K`` layers: the chain
runs over layers ``K .. L-1`` only (Chefer et al.'s ``start_layer``). The seed (the row read) is
the layout's (:meth:`.chain.TokenLayout.seed`): the class token's, the mean of the patch tokens'
rows for a model without one, or a weighted mix of prefix rows and the patch mean.

The four functions at the end (:func:`rollout`, :func:`grad_rollout`, :func:`gae`,
:func:`attention`) are what the registry points at: one signature, raw or graph-fused maps.
The ``*_rows`` functions take the arrays directly (tests, the parity checks).
"""

from __future__ import annotations

import numpy as np

from .chain import (
    LayerMaps,
    Layers,
    TokenLayout,
    layer_order,
    layers_shape,
    linear_step,
    propagate,
    residual_step,
    rollout_step,
    rows_to_masks,
)
from .fusion import fuse_heads, fused_discarded, gradient_fused_discarded, weighted_head_mean
from .selection import discard_lowest
from .settings import Settings

__all__ = [
    "rollout_rows",
    "rollout_rows_from_fused",
    "gae_rows",
    "gae_rows_from_fused",
    "attention_rows",
    "rollout_masks",
    "gae_masks",
    "attention_masks",
    "rollout",
    "grad_rollout",
    "gae",
    "attention",
]


def rollout_rows(
    attentions: Layers,
    gradients: Layers | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The rolled-out relevance of each patch token, ``[B, num_patches]`` (unscaled, float64).

    ``attentions`` (and ``gradients`` for gradient rollout) are ``[L, B, heads, N, N]``.
    """
    layers, batch, tokens = layers_shape(attentions, gradients)
    layout = TokenLayout(num_prefix_tokens, has_class_token, seed_weights)
    order = layer_order(layers, start_layer)
    if gradients is None:
        maps = (fused_discarded(attentions[layer], head_fusion, discard_ratio) for layer in order)
    else:
        maps = (
            gradient_fused_discarded(attentions[layer], gradients[layer], head_fusion, discard_ratio)
            for layer in order
        )
    return layout.patches(propagate(layout.seed(batch, tokens), map(rollout_step, maps)))


def rollout_rows_from_fused(
    fused_maps: np.ndarray,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """:func:`rollout_rows` from maps already fused by the graph (:mod:`vit_explain.graph`):
    ``[L, B, N, N]``, the heads fused (and for gradient rollout weighted and clamped). Float32
    maps (max/min fusion) are discarded in float32, as :func:`rollout_rows` does; the input is
    not modified."""
    layers, batch, tokens, _ = fused_maps.shape
    layout = TokenLayout(num_prefix_tokens, has_class_token, seed_weights)
    maps = (
        discard_lowest(fused_maps[layer].copy(), discard_ratio).astype(np.float64, copy=False)
        for layer in layer_order(layers, start_layer)
    )
    return layout.patches(propagate(layout.seed(batch, tokens), map(rollout_step, maps)))


def gae_rows(
    attentions: Layers,
    gradients: Layers,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Generic Attention Explainability (Chefer et al. 2021): ``[B, num_patches]``, unscaled float64.

    ``R = (I + Abar_L) ... (I + Abar_K)`` with ``Abar_l = mean_heads(max(G_l * A_l, 0))``;
    returns the start row (class token) of ``R`` over the patch tokens.
    """
    if gradients is None:
        raise ValueError("gae needs the attention gradients")
    layers, batch, tokens = layers_shape(attentions, gradients)
    layout = TokenLayout(num_prefix_tokens, has_class_token, seed_weights)
    # Forward recurrence R_l = R_{l-1} + Abar_l R_{l-1} = (I + Abar_l) R_{l-1}, so the first
    # factor applied to the row vector is the last layer's.
    maps = (
        weighted_head_mean(attentions[layer], gradients[layer], clamp_heads=True)
        for layer in layer_order(layers, start_layer)
    )
    return layout.patches(propagate(layout.seed(batch, tokens), map(residual_step, maps)))


def gae_rows_from_fused(
    fused_maps: np.ndarray,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """:func:`gae_rows` from ``Abar_l`` already computed by the graph: ``[L, B, N, N]`` float64."""
    layers, batch, tokens, _ = fused_maps.shape
    layout = TokenLayout(num_prefix_tokens, has_class_token, seed_weights)
    maps = (fused_maps[layer] for layer in layer_order(layers, start_layer))
    return layout.patches(propagate(layout.seed(batch, tokens), map(residual_step, maps)))


def attention_rows(
    attentions: Layers,
    head_fusion: str,
    num_prefix_tokens: int,
    has_class_token: bool = True,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The last layer's attention from the class token to each patch, heads fused: ``[B, num_patches]``."""
    _, batch, tokens = layers_shape(attentions, None)
    layout = TokenLayout(num_prefix_tokens, has_class_token, seed_weights)
    fused = fuse_heads(attentions[-1].astype(np.float64), head_fusion)
    return layout.patches(propagate(layout.seed(batch, tokens), [linear_step(fused)]))


def rollout_masks(
    attentions: Layers,
    gradients: Layers | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    rows = rollout_rows(
        attentions, gradients, head_fusion, discard_ratio, num_prefix_tokens, has_class_token, start_layer
    )
    return rows_to_masks(rows, grid_size)


def gae_masks(
    attentions: Layers,
    gradients: Layers,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
    start_layer: int = 0,
    seed_weights: tuple[float, ...] | None = None,
) -> np.ndarray:
    """GAE masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    return rows_to_masks(gae_rows(attentions, gradients, num_prefix_tokens, has_class_token, start_layer), grid_size)


def attention_masks(
    attentions: Layers,
    head_fusion: str,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
) -> np.ndarray:
    """Last-layer attention masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    return rows_to_masks(attention_rows(attentions, head_fusion, num_prefix_tokens, has_class_token), grid_size)


# -- the registry's entry points: (maps, settings, layout) -> unscaled rows [B, num_patches] --
def rollout(maps: LayerMaps, settings: Settings, layout: TokenLayout) -> np.ndarray:
    prefix, has_cls, seed = layout.num_prefix_tokens, layout.has_class_token, layout.seed_weights
    if maps.fused is not None:
        return rollout_rows_from_fused(maps.fused, settings.discard_ratio, prefix, has_cls, settings.start_layer, seed)
    return rollout_rows(
        maps.attentions, None, settings.head_fusion, settings.discard_ratio, prefix, has_cls, settings.start_layer, seed
    )


def grad_rollout(maps: LayerMaps, settings: Settings, layout: TokenLayout) -> np.ndarray:
    if maps.fused is not None:  # the graph weighted, fused and clamped: rollout's chain from here
        return rollout(maps, settings, layout)
    if maps.gradients is None:
        raise ValueError("grad_rollout needs the attention gradients")
    return rollout_rows(
        maps.attentions, maps.gradients, settings.head_fusion, settings.discard_ratio,
        layout.num_prefix_tokens, layout.has_class_token, settings.start_layer, layout.seed_weights,
    )


def gae(maps: LayerMaps, settings: Settings, layout: TokenLayout) -> np.ndarray:
    prefix, has_cls, seed = layout.num_prefix_tokens, layout.has_class_token, layout.seed_weights
    if maps.fused is not None:
        return gae_rows_from_fused(maps.fused, prefix, has_cls, settings.start_layer, seed)
    return gae_rows(maps.attentions, maps.gradients, prefix, has_cls, settings.start_layer, seed)


def attention(maps: LayerMaps, settings: Settings, layout: TokenLayout) -> np.ndarray:
    if maps.attentions is None:
        raise ValueError("attention reads the raw last-layer attention, not graph-fused maps")
    return attention_rows(
        maps.attentions, settings.head_fusion, layout.num_prefix_tokens, layout.has_class_token, layout.seed_weights
    )
