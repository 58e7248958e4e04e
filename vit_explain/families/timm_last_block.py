"""Run the last block on the tokens the head reads only, in the exported graph.

A ViT or DeiT that pools its class token (``global_pool="token"``) reads nothing of the last
block's output but the class (and distillation) token. The last block's attention probabilities
must still be computed for every query, since its full map is one of the graph's outputs, and
the keys and values of every token feed the class token's row. But the rest of the block works
token by token (or, for the attention's weighted sum, query by query), so for the other
``N - 1`` tokens it feeds nothing: on DeiT-tiny that is 1/12 of the MLP, output projection and
``A @ V`` work, forward and backward, about 5% of a gradient call.

Inside :func:`head_tokens_only`, the last block computes the attention map exactly as timm does,
then takes only the prefix tokens' rows of it into ``A @ V``, and keeps the prefix tokens alone
for the rest of the block; the final norm and the head then see ``[B, num_prefix_tokens, D]``
instead of ``[B, N, D]``, and read the same rows as before. The outputs are the same values, to
float32 rounding (a product over fewer rows may sum in another order): the logits come from the
same rows, every attention map is the full map, and the last layer's attention gradient is the
same (its rows for the other tokens were exactly zero before, as they are now). The export's
parity check compares the graph with the unmodified eager model, so a mismatch would stop the
export.

Only timm's own ``VisionTransformer`` and ``VisionTransformerDistilled`` classes (ViT, DeiT,
DINOv2, ...) with timm's plain ``Block`` as their last block are rewritten; every other model is
traced as it is. The attention's query-row cut re-states timm's ``Attention`` code, so it is used
only for that exact class, and only after it has reproduced timm's own attention on the example
input (another timm version may have changed it); otherwise only the MLP half of the block is cut.
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
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    # Exactly these classes: a subclass could read other tokens in its own head.
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        return None
    if getattr(model, "attn_pool", None) is not None:
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


def _plain_attention(attention: nn.Module) -> bool:
    """timm's ``Attention`` itself, whose unfused forward :func:`_attend_for_prefix` follows."""
    from timm.models.vision_transformer import (
        Attention,  # defined there before timm moved it to layers
    )

    return type(attention) is Attention and "forward" not in vars(attention)


def _attend_for_prefix(attention: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor:
    """timm ``Attention.forward`` (unfused, no mask) for the first ``keep`` queries: the whole
    probability map is computed and passes ``attn_drop`` (where the recorder taps it), then only
    its first ``keep`` rows weight the values. Returns ``[B, keep, dim]``. Attributes that only
    some timm versions have (the output gate, the scale norm) are used when present."""
    batch, tokens, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    gate_layer = getattr(attention, "gate", None)
    gate = gate_layer(x[:, :keep]).sigmoid() if gate_layer is not None else None
    qkv = attention.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    q = q * attention.scale
    probabilities = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    probabilities = attention.attn_drop(probabilities)
    out = (probabilities[:, :, :keep] @ v).transpose(1, 2).reshape(batch, keep, heads * head_dim)
    norm = getattr(attention, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attention.proj_drop(attention.proj(out))


def _attention_replica_agrees(model: nn.Module, example_pixels: torch.Tensor, keep: int) -> bool:
    """Whether :func:`_attend_for_prefix` gives what timm's own attention module gives for the
    head's tokens, on the last block's real input for one example image.

    The replica follows timm's code, which may change in another timm version; if it no longer
    agrees, only the MLP half of the block is cut to the head's tokens (which calls timm's
    attention as it is), rather than the export failing its parity check."""
    block = model.blocks[-1]
    captured: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            model(example_pixels[:1])
            x = block.norm1(captured[0])
            expected = block.attn(x)[:, :keep]
            replica = _attend_for_prefix(block.attn, x, keep)
    except Exception:  # noqa: BLE001 - an attribute or shape this timm version does not have
        return False
    finally:
        hook.remove()
    if replica.shape != expected.shape:
        return False
    scale = float(expected.abs().max())
    return float((replica - expected).abs().max()) <= 1e-4 * max(scale, 1e-12)


def _forward_on_prefix(block: nn.Module, keep: int, replicate_attention: bool):
    """timm's ``Block.forward``, with the residual stream cut to the first ``keep`` tokens after
    the attention, or from its weighted sum on with ``replicate_attention`` (the attention map
    still covers every token either way). A mask or causal attention, which the export never
    passes, runs timm's own block and slices its output."""
    original = block.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if any(value is not None and value is not False for value in (*args, *kwargs.values())):
            return original(x, *args, **kwargs)[:, :keep]
        y = block.norm1(x)
        attended = _attend_for_prefix(block.attn, y, keep) if replicate_attention else block.attn(y)[:, :keep]
        x = x[:, :keep] + block.drop_path1(block.ls1(attended))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return forward


@contextlib.contextmanager
def head_tokens_only(model: nn.Module, example_pixels: torch.Tensor) -> Iterator[bool]:
    """While active, the model's last block continues only the tokens its head reads (see the
    module docstring). ``example_pixels``: an input to check the attention replica on. Yields
    whether the model was rewritten; restores it on exit."""
    keep = tokens_read_by_head(model)
    if keep is None:
        yield False
        return
    block = model.blocks[-1]
    replicate = _plain_attention(block.attn) and _attention_replica_agrees(model, example_pixels, keep)
    block.forward = _forward_on_prefix(block, keep, replicate)
    try:
        yield True
    finally:
        del block.forward
