"""The relevance chain every method is: a seed row times one linear map per block, last block first.

A method explains the model's output through a token-to-token relevance matrix
``R = M_L @ ... @ M_K`` (``M_l`` built from block ``l``'s attention) and reads one row of it: the
class token's, or the mean of the rows the head averages. That row is computed directly, as the
seed row times ``M_L``, then ``M_{L-1}``, ... (vector x matrix, ``N^2`` a block), never the
``N x N`` chain (``N^3``). What differs between methods is the seed and how a block's map acts on
the row (a :data:`Step`):

- rollout: ``row @ D^-1 (F + I)`` (:func:`rollout_step`), ``F`` the block's fused attention;
- GAE: ``row @ (I + Abar)`` (:func:`residual_step`);
- last-layer attention: one block, ``row @ F`` (:func:`linear_step`).

Room for other architectures: a step is any function of the row, so a map that changes the
token count between blocks (Swin's patch merging: ``[B, 1, N] -> [B, 1, N / 4]``) is one more
step in the sequence, and a block-diagonal (windowed) map is a step that reshapes the row into
windows and multiplies each by its own block. The seed comes from :class:`TokenLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .settings import check_start_layer

__all__ = [
    "Layers",
    "LayerMaps",
    "TokenLayout",
    "Step",
    "seed_weights_for",
    "seed_row",
    "layers_shape",
    "layer_order",
    "propagate",
    "rollout_step",
    "residual_step",
    "linear_step",
    "scale_to_unit_max",
    "rows_to_masks",
]

#: Per-layer maps: ``[L, B, heads, N, N]``, or a sequence of ``L`` arrays ``[B, heads, N, N]``
#: (what :meth:`~vit_explain.runtime.session.ModelSession.run_layers` returns, unstacked).
Layers = np.ndarray | Sequence[np.ndarray]
#: One block's linear map applied to the relevance rows from the right: ``[B, 1, N] -> [B, 1, N']``.
Step = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LayerMaps:
    """What the graph returned for a batch (or a slice of it), in one of two forms: the raw
    per-head ``attentions`` (and ``gradients`` for class-specific methods), or ``fused``, one
    map per layer ``[L, B, N, N]`` already fused by the graph's variant for the method."""

    attentions: Layers | None = None
    gradients: Layers | None = None
    fused: np.ndarray | None = None


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens sit: after ``num_prefix_tokens`` (class, distillation, register
    tokens); and which row of the relevance matrix the head reads (the seed).

    ``seed_weights``, when given, is one weight per prefix token plus a last one for the mean of
    the patch tokens' rows (the metadata's ``seed_weights``): ``(0.5, 0.5, 0.0)`` is the average
    of the class and distillation rows (DeiT with teacher), ``(0.5, 0.5)`` an even mix of the class
    row and the patch mean (a head reading ``[CLS, mean of patches]``). ``None`` keeps the rule
    files without the field follow: the class row when ``has_class_token``, else the patch mean.
    """

    num_prefix_tokens: int
    has_class_token: bool = True
    seed_weights: tuple[float, ...] | None = None

    def seed(self, batch: int, tokens: int) -> np.ndarray:
        """The rows the chain starts from, ``[B, 1, N]`` float64 (see :func:`seed_row`)."""
        row = seed_row(tokens, self.num_prefix_tokens, self.has_class_token, self.seed_weights)
        return np.broadcast_to(row, (batch, 1, tokens)).copy()

    def patches(self, rows: np.ndarray) -> np.ndarray:
        """``[B, 1, N]`` -> the patch tokens' relevance ``[B, num_patches]``."""
        return rows[:, 0, self.num_prefix_tokens:]


def seed_weights_for(
    num_prefix_tokens: int, has_class_token: bool, seed_weights: tuple[float, ...] | None = None
) -> tuple[float, ...]:
    """The seed as weights: one per prefix token, then one for the mean of the patch rows.
    Without explicit ``seed_weights``: the class token alone, or the patch mean alone."""
    if seed_weights is not None:
        if len(seed_weights) != num_prefix_tokens + 1:
            raise ValueError(
                f"seed_weights needs {num_prefix_tokens + 1} values (one per prefix token, then the patch mean), "
                f"got {len(seed_weights)}"
            )
        return tuple(float(w) for w in seed_weights)
    weights = [0.0] * (num_prefix_tokens + 1)
    weights[0 if has_class_token else -1] = 1.0
    return tuple(weights)


def seed_row(
    tokens: int, num_prefix_tokens: int, has_class_token: bool = True, seed_weights: tuple[float, ...] | None = None
) -> np.ndarray:
    """The seed as one token row ``[N]`` float64: each prefix token's weight at its own place,
    the patch-mean weight spread evenly over the patch tokens (the mean of their rows)."""
    weights = seed_weights_for(num_prefix_tokens, has_class_token, seed_weights)
    row = np.zeros(tokens, dtype=np.float64)
    row[:num_prefix_tokens] = weights[:num_prefix_tokens]
    row[num_prefix_tokens:] = weights[-1] / (tokens - num_prefix_tokens)
    return row


def layers_shape(attentions: Layers, gradients: Layers | None) -> tuple[int, int, int]:
    """``(layers, batch, tokens)`` after checking every layer (and gradient) has one shape."""
    shapes = {np.shape(layer) for layer in attentions}
    if len(attentions) == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 4:
        found = np.shape(attentions) if isinstance(attentions, np.ndarray) else sorted(shapes)
        raise ValueError(f"attentions must be [layers, batch, heads, tokens, tokens], got shape {found}")
    (shape,) = shapes
    if gradients is not None and (len(gradients) != len(attentions) or {np.shape(g) for g in gradients} != shapes):
        found = np.shape(gradients) if isinstance(gradients, np.ndarray) else [np.shape(g) for g in gradients]
        raise ValueError(f"gradients {found} do not match attentions {(len(attentions), *shape)}")
    return len(attentions), shape[0], shape[2]


def layer_order(layers: int, start_layer: int) -> range:
    """Layers in the order the row meets them: the last first, down to ``start_layer`` (checked now)."""
    return range(layers - 1, check_start_layer(start_layer, layers) - 1, -1)


def propagate(seed: np.ndarray, steps: Iterable[Step]) -> np.ndarray:
    """The seed rows through every step in turn. ``steps`` may be a generator, so each block's
    map is built just before it is applied and freed after (one ``N x N`` map alive at a time)."""
    rows = seed
    for step in steps:
        rows = step(rows)
    return rows


def rollout_step(fused: np.ndarray) -> Step:
    """``row @ a`` for ``a = D^-1 (F + I)``, D the row sums of ``F + I`` (the 1/2 of ``(F + I) / 2``
    cancels), as ``(row / d) @ F + row / d``: the identity and the division never touch N x N values."""

    def step(row: np.ndarray) -> np.ndarray:
        scaled = row / (fused.sum(axis=-1) + 1.0)[:, None, :]
        return scaled @ fused + scaled

    return step


def residual_step(update: np.ndarray) -> Step:
    """``row @ (I + U)`` as ``row + row @ U`` (GAE's ``R <- R + Abar R``, applied from the right)."""
    return lambda row: row + row @ update


def linear_step(matrix: np.ndarray) -> Step:
    """``row @ M``."""
    return lambda row: row @ matrix


def scale_to_unit_max(rows: np.ndarray) -> np.ndarray:
    """Scale each row to max 1 (an all-zero row stays zero, never NaN)."""
    peak = rows.max(axis=-1, keepdims=True)
    return np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)


def rows_to_masks(rows: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """``[B, num_patches]`` relevance -> masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    grid_h, grid_w = grid_size
    if rows.shape[1] != grid_h * grid_w:
        raise ValueError(f"{rows.shape[1]} patch tokens do not fill a {grid_h}x{grid_w} grid")
    return scale_to_unit_max(rows).astype(np.float32).reshape(rows.shape[0], grid_h, grid_w)
