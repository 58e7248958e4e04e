"""Attention Rollout and Gradient Attention Rollout in vectorised numpy, batched.

Per image and layer ``l`` (Abnar & Zuidema 2020; gradient variant as in the original vit-explain):

1. fuse the heads (mean, min or max) of ``A_l`` (rollout) or of ``A_l * G_l`` clamped at 0
   afterwards (gradient rollout);
2. zero the lowest ``int(N * N * discard_ratio)`` entries of the fused ``N x N`` map, except the
   class token's attention to itself (flat index 0) when it is among them;
3. ``a_l = (fused + I) / 2`` with each row divided by its own sum (the residual connection);
4. ``R = a_L @ ... @ a_1`` and the mask is the class token's row of ``R`` over the patch tokens.

Only that row is ever needed, so it is computed as ``e_cls @ a_L @ ... @ a_1``: one vector-matrix
product per layer, last layer first, never the ``N x N`` chain. For a model without a class
token, the start vector is the mean of the patch tokens' rows (documented in the README).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["HEAD_FUSIONS", "METHODS", "fuse_heads", "discard_lowest", "rollout_rows", "rollout_masks", "scale_to_unit_max"]

HEAD_FUSIONS = ("mean", "min", "max")
METHODS = ("rollout", "grad_rollout")

_FUSERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x.mean(axis=1),
    "max": lambda x: x.max(axis=1),
    "min": lambda x: x.min(axis=1),
}


def fuse_heads(attention: np.ndarray, head_fusion: str) -> np.ndarray:
    """``[B, heads, N, N] -> [B, N, N]``."""
    try:
        return _FUSERS[head_fusion](attention)
    except KeyError:
        raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, not {head_fusion!r}") from None


def discard_lowest(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Zero, per image, the lowest ``int(N*N*discard_ratio)`` entries, sparing flat index 0. In place."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), not {discard_ratio}")
    batch = fused.shape[0]
    flat = fused.reshape(batch, -1)
    count = int(flat.shape[1] * discard_ratio)
    if count == 0:
        return fused
    lowest = np.argpartition(flat, count - 1, axis=1)[:, :count]
    kept = np.take_along_axis(flat, lowest, axis=1) * (lowest == 0)
    np.put_along_axis(flat, lowest, kept, axis=1)
    return fused


def _start_rows(batch: int, tokens: int, num_prefix_tokens: int, has_class_token: bool) -> np.ndarray:
    rows = np.zeros((batch, 1, tokens), dtype=np.float64)
    if has_class_token:
        rows[:, 0, 0] = 1.0
    else:
        rows[:, 0, num_prefix_tokens:] = 1.0 / (tokens - num_prefix_tokens)
    return rows


def rollout_rows(
    attentions: np.ndarray,
    gradients: np.ndarray | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    has_class_token: bool = True,
) -> np.ndarray:
    """The rolled-out relevance of each patch token, ``[B, num_patches]`` (unscaled, float64).

    ``attentions`` (and ``gradients`` for gradient rollout) are ``[L, B, heads, N, N]``.
    """
    layers, batch, _, tokens, _ = attentions.shape
    if gradients is not None and gradients.shape != attentions.shape:
        raise ValueError(f"gradients {gradients.shape} do not match attentions {attentions.shape}")
    identity = np.eye(tokens, dtype=np.float64)
    row = _start_rows(batch, tokens, num_prefix_tokens, has_class_token)
    for layer in range(layers - 1, -1, -1):
        if gradients is None:
            fused = fuse_heads(attentions[layer].astype(np.float64), head_fusion)
        else:
            weighted = attentions[layer].astype(np.float64) * gradients[layer]
            fused = np.maximum(fuse_heads(weighted, head_fusion), 0.0)
        discard_lowest(fused, discard_ratio)
        fused += identity
        # (fused + I) / 2 then row-normalised: the 1/2 cancels in the division.
        fused /= fused.sum(axis=-1, keepdims=True)
        row = row @ fused
    return row[:, 0, num_prefix_tokens:]


def scale_to_unit_max(rows: np.ndarray) -> np.ndarray:
    """Scale each row to max 1 (an all-zero row stays zero, never NaN)."""
    peak = rows.max(axis=-1, keepdims=True)
    return np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)


def rollout_masks(
    attentions: np.ndarray,
    gradients: np.ndarray | None,
    head_fusion: str,
    discard_ratio: float,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    has_class_token: bool = True,
) -> np.ndarray:
    """Masks ``[B, grid_h, grid_w]`` float32, each scaled to max 1."""
    rows = rollout_rows(attentions, gradients, head_fusion, discard_ratio, num_prefix_tokens, has_class_token)
    grid_h, grid_w = grid_size
    if rows.shape[1] != grid_h * grid_w:
        raise ValueError(f"{rows.shape[1]} patch tokens do not fill a {grid_h}x{grid_w} grid")
    return scale_to_unit_max(rows).astype(np.float32).reshape(rows.shape[0], grid_h, grid_w)
