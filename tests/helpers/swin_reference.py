"""The dense float64 oracle for Swin: every ``M``, ``P`` and ``a`` built as a full matrix, then multiplied.

It shares no code with :mod:`vit_explain.methods.windowed` (which never builds an ``N x N``
matrix): where a window slot's token sits is found by pushing a grid of token ids through timm's
own operations (``torch.roll`` by ``-shift``, the zero padding, ``window_partition``), not by the
runtime's arithmetic; the discard sorts the in-window entries of the dense ``M`` read row by row;
the chain is a product of dense matrices. torch is imported lazily (the helpers package is
imported by torch-free tests too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def swin_blocks(model) -> list:
    return [block for stage in model.layers for block in stage.blocks]


def slot_ids(block) -> np.ndarray:
    """``[windows, w*w]``: the original token id at each window slot of ``block``, -1 for padding,
    found with timm's roll, pad and window_partition on a grid of ids."""
    import torch
    from timm.models.swin_transformer import window_partition

    rows, columns = block.input_resolution
    wh, ww = block.window_size
    ids = torch.arange(rows * columns, dtype=torch.float64).reshape(1, rows, columns, 1)
    if any(block.shift_size):
        ids = torch.roll(ids, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    pad_h, pad_w = (wh - rows % wh) % wh, (ww - columns % ww) % ww
    ids = torch.nn.functional.pad(ids + 1, (0, 0, 0, pad_w, 0, pad_h)) - 1  # padding -> -1
    return window_partition(ids, (wh, ww)).reshape(-1, wh * ww).long().numpy()


def hf_slot_ids(block, grid: tuple[int, int]) -> np.ndarray:
    """As :func:`slot_ids` for a transformers ``SwinLayer`` on ``grid``, with transformers' own
    operations: its window clamping, ``maybe_pad`` (before the shift), ``cyclic_shift`` and
    ``window_partition``."""
    import torch
    from transformers.models.swin.modeling_swin import window_partition

    block.set_shift_and_window_size(grid)
    ids = torch.arange(grid[0] * grid[1], dtype=torch.float64).reshape(1, grid[0], grid[1], 1)
    padded, _ = block.maybe_pad(ids + 1, grid[0], grid[1])  # padding -> 0, then -1 below
    windows = window_partition(block.cyclic_shift(padded), int(block.window_size)) - 1
    return windows.reshape(windows.shape[0], -1).long().numpy()


@dataclass(frozen=True)
class Structure:
    """Where every block's window slots sit, which stage each block is in, and the stage grids."""

    ids: list[np.ndarray]
    stage_of: list[int]
    grids: list[tuple[int, int]]


def timm_structure(model) -> Structure:
    return Structure(
        [slot_ids(block) for block in swin_blocks(model)],
        [index for index, stage in enumerate(model.layers) for _ in stage.blocks],
        [tuple(stage.blocks[0].input_resolution) for stage in model.layers],
    )


def hf_structure(wrapped) -> Structure:
    """The structure of a wrapped transformers Swin (``HFVisionModel``), stage grids by ceil(/2)."""
    swin = getattr(wrapped.model, "swin", wrapped.model)
    grid = tuple(swin.embeddings.patch_embeddings.grid_size)
    ids, stage_of, grids = [], [], []
    for index, stage in enumerate(swin.encoder.layers):
        grids.append(grid)
        for block in stage.blocks:
            ids.append(hf_slot_ids(block, grid))
            stage_of.append(index)
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    return Structure(ids, stage_of, grids)


def eager_maps(model, pixels, class_weights=None, recorder=None):
    """Logits and each block's attention (and gradient) ``[B, windows, heads, a, a]`` float32 from
    the eager model, through the same taps the exporter traces (timm's hooks unless ``recorder``,
    e.g. the transformers adapter's taps, is given)."""
    import torch

    from vit_explain.eager import AttentionRecorder

    batch = pixels.shape[0]
    if recorder is None:
        recorder = AttentionRecorder(model, capture_gradients=class_weights is not None)
    with recorder:
        recorder.reset()
        with torch.enable_grad():
            x = pixels.detach().clone().requires_grad_(class_weights is not None)
            logits = model(x)
            if class_weights is not None:
                (logits * class_weights).sum().backward()
        shape = lambda t: t.detach().reshape(batch, -1, *t.shape[1:]).numpy()  # noqa: E731
        attentions = [shape(a) for a in recorder.attentions]
        gradients = None
        if class_weights is not None:
            gradients = [shape(recorder.gradients[i]) for i in range(len(attentions))]
    return logits.detach().numpy(), attentions, gradients


def _fuse(values, fusion: str):
    if fusion == "mean":
        return values.mean(dim=2)
    return values.amax(dim=2) if fusion == "max" else values.amin(dim=2)


def _pairs(ids: np.ndarray):
    """Every (window, query slot, key slot) with both tokens real, and their token ids."""
    rows = np.broadcast_to(ids[:, :, None], (*ids.shape, ids.shape[1]))
    columns = np.broadcast_to(ids[:, None, :], rows.shape)
    real = (rows >= 0) & (columns >= 0)
    return real, rows[real], columns[real]


def dense_map(fused, ids: np.ndarray, tokens: int):
    """``M`` ``[B, N, N]`` float64 from fused windows ``[B, windows, a, a]`` and the slot ids."""
    import torch

    real, rows, columns = _pairs(ids)
    dense = torch.zeros(fused.shape[0], tokens, tokens, dtype=torch.float64)
    dense[:, torch.as_tensor(rows), torch.as_tensor(columns)] = fused[:, torch.as_tensor(real)]
    return dense


def structure(ids: np.ndarray, tokens: int):
    """Boolean ``[N, N]``: both tokens in one window of the block (the discard's candidates)."""
    import torch

    _, rows, columns = _pairs(ids)
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    mask[torch.as_tensor(rows), torch.as_tensor(columns)] = True
    return mask


def merge_matrix(fine: tuple[int, int], coarse: tuple[int, int]):
    """``P`` ``[N_coarse, N_fine]``: merged token (i, j) to each of (2i+p, 2j+q), weight 1/4."""
    import torch

    matrix = torch.zeros(coarse[0] * coarse[1], fine[0] * fine[1], dtype=torch.float64)
    for i in range(coarse[0]):
        for j in range(coarse[1]):
            for p in (0, 1):
                for q in (0, 1):
                    r, c = 2 * i + p, 2 * j + q
                    if r < fine[0] and c < fine[1]:
                        matrix[i * coarse[1] + j, r * fine[1] + c] = 0.25
    return matrix


def dense_swin_rows(
    model,
    attentions: Sequence[np.ndarray],
    gradients: Sequence[np.ndarray] | None,
    method: str,
    head_fusion: str | None = None,
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> np.ndarray:
    """The unscaled mask row ``seed . a_L ... P ... a_K . P ...`` over the first stage, ``[B, N_0]``.
    ``model``: a timm Swin, or a :class:`Structure` (:func:`hf_structure`)."""
    import torch

    structure_ = model if isinstance(model, Structure) else timm_structure(model)
    stage_of, grids = structure_.stage_of, structure_.grids
    blocks = structure_.ids
    batch = attentions[0].shape[0]
    chain = None  # the product so far, [N_last, N_current]
    last = len(grids) - 1
    current = last
    chosen = [len(blocks) - 1] if method == "attention" else list(range(len(blocks) - 1, start_layer - 1, -1))
    for index in chosen:
        while current > stage_of[index]:
            step = merge_matrix(grids[current - 1], grids[current]).expand(batch, -1, -1)
            chain = step if chain is None else chain @ step
            current -= 1
        tokens = grids[current][0] * grids[current][1]
        a = torch.as_tensor(attentions[index], dtype=torch.float64)
        g = None if gradients is None else torch.as_tensor(gradients[index], dtype=torch.float64)
        if method == "gae":
            fused = (a * g).clamp(min=0).mean(dim=2)
        elif method == "grad_rollout":
            fused = _fuse(a * g, head_fusion).clamp(min=0)
        else:
            fused = _fuse(a, head_fusion)
        ids = blocks[index]
        dense = dense_map(fused, ids, tokens)
        eye = torch.eye(tokens, dtype=torch.float64)
        if method in ("rollout", "grad_rollout"):
            inside = structure(ids, tokens)
            count = int(int(inside.sum()) * discard_ratio)
            for item in range(batch):
                values = dense[item][inside]  # row-major order of M
                order = torch.as_tensor(np.argsort(values.numpy(), kind="stable"))
                values[order[:count]] = 0.0
                dense[item][inside] = values
            step = (dense + eye) / 2
            step = step / step.sum(dim=-1, keepdim=True)
        elif method == "gae":
            step = eye + dense
        else:
            step = dense
        chain = step if chain is None else chain @ step
    while current > 0:
        chain = chain @ merge_matrix(grids[current - 1], grids[current]).expand(batch, -1, -1)
        current -= 1
    seed = torch.full((batch, 1, grids[last][0] * grids[last][1]), 1.0 / (grids[last][0] * grids[last][1]), dtype=torch.float64)
    return (seed @ chain)[:, 0].numpy()


def scaled(rows: np.ndarray) -> np.ndarray:
    peak = rows.max(axis=1, keepdims=True)
    return np.divide(rows, peak, out=np.zeros_like(rows), where=peak > 0)
