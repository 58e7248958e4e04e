"""Run the last block's MLP only on the tokens the head reads, in the exported graph.

A ViT or DeiT that pools its class token (``global_pool="token"``) reads nothing of the last
block's output but the class (and distillation) token. The last block's attention must still be
computed for every token, since its full map is one of the graph's outputs, and the keys and
values of every token feed the class token's row. But the second half of the block (norm, MLP,
residual) works token by token, so for the other ``N - 1`` tokens it feeds nothing: on DeiT-tiny
that is 1/12 of the MLP work, forward and backward, about 4% of a gradient call.

Inside :func:`head_tokens_only`, the last block computes its attention exactly as timm does and
then keeps the prefix tokens alone for the rest of the block; the final norm and the head then
see ``[B, num_prefix_tokens, D]`` instead of ``[B, N, D]``, and read the same rows as before. The
outputs are the same numbers: the logits come from the same rows, every attention map is the
full map, and the last layer's attention gradient is the same (its rows for the other tokens
were exactly zero before, as they are now). The export's parity check compares the graph with
the unmodified eager model, so a mismatch would stop the export.

Only timm's own ``VisionTransformer`` (DeiT and DeiT-distilled included) with timm's plain
``Block`` as its last block is rewritten; every other model is traced as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["tokens_read_by_head", "head_tokens_only"]


def tokens_read_by_head(model: nn.Module) -> int | None:
    """How many leading tokens of the last block's output the head reads, or ``None`` when the
    model is not one this rewrite knows to be safe (then it reads them all, as far as we know)."""
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer) or getattr(model, "attn_pool", None) is not None:
        return None
    if getattr(model, "global_pool", None) != "token" or getattr(model, "cls_token", None) is None:
        return None
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return None
    last = blocks[-1]
    if type(last) is not Block or "forward" in vars(last):
        return None
    keep = int(getattr(model, "num_prefix_tokens", 1))
    return keep if keep >= 1 else None


def _forward_on_prefix(block: nn.Module, keep: int):
    """timm's ``Block.forward``, with the residual stream cut to the first ``keep`` tokens after
    the attention (which still sees, and maps, every token)."""

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        attended = block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x[:, :keep] + block.drop_path1(block.ls1(attended[:, :keep]))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return forward


@contextlib.contextmanager
def head_tokens_only(model: nn.Module) -> Iterator[bool]:
    """While active, the model's last block continues only the tokens its head reads (see the
    module docstring). Yields whether the model was rewritten; restores it on exit."""
    keep = tokens_read_by_head(model)
    if keep is None:
        yield False
        return
    block = model.blocks[-1]
    block.forward = _forward_on_prefix(block, keep)
    try:
        yield True
    finally:
        del block.forward
