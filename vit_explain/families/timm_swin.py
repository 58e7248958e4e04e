"""The adapter for timm's Swin Transformer (v1, ``swin_*``): shifted windows and patch merging.

Building, checkpoints, class names and preprocessing are timm's, as for ViTs (the class extends
:class:`~.timm_vit.TimmViT`). What differs: the attention taps are every block's
``WindowAttention`` (fused attention off, its ``attn_drop`` output: the post-softmax window
probabilities, shift mask included, that the block really multiplies), the token layout is the
windowed one (:class:`vit_explain.windowing.WindowedLayout`: stage grids, each block's window,
shift and heads, 2x2 merges between stages), the head averages the last stage's tokens, and the
per-block attentions, whose shapes differ between stages, are packed per image into one
``[B, values]`` output. The last-block rewrite of the ViT path does not apply (there is no class
token to keep).

Other windowed or hierarchical models in timm (Swin V2, MaxViT, Twins, NesT, Hiera, DaViT, ...)
are refused with one line: their attention is not (only) Swin v1's shifted windows.
"""

from __future__ import annotations

import contextlib

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from ..eager import attention_modules
from ..errors import ExportError
from ..windowing import WindowedLayout, WindowLayoutError
from .base import HeadReading, ModelFamily, TokenLayout
from .timm_vit import TimmViT

__all__ = ["TimmSwin", "timm_family_for"]

#: timm modules of windowed / hierarchical attention models this adapter does not explain.
_OTHER_WINDOWED = {
    "swin_transformer_v2": "Swin V2 (scaled cosine attention, log-spaced position bias)",
    "swin_transformer_v2_cr": "Swin V2 (scaled cosine attention, log-spaced position bias)",
    "maxxvit": "MaxViT/CoAtNet (block and grid attention)",
    "twins": "Twins (locally-grouped and sub-sampled attention)",
    "nest": "NesT (nested blocks with aggregation)",
    "hiera": "Hiera (mask-unit attention)",
    "hieradet_sam2": "Hiera (mask-unit attention)",
    "davit": "DaViT (channel and window attention)",
    "gcvit": "GC ViT (global context attention)",
    "mvitv2": "MViTv2 (pooling attention)",
    "focalnet": "FocalNet (no attention)",
}


def _unsupported(model: nn.Module, reason: str) -> ExportError:
    return ExportError(f"{type(model).__name__} is not supported yet: {reason}")


def timm_family_for(model: nn.Module, default: ModelFamily) -> ModelFamily:
    """The timm adapter for a built model: Swin v1 here, other windowed models refused, anything
    else ``default`` (the ViT adapter)."""
    if isinstance(model, SwinTransformer):
        return SWIN
    module = type(model).__module__.rsplit(".", 1)[-1]
    if module in _OTHER_WINDOWED:
        raise _unsupported(
            model, f"{_OTHER_WINDOWED[module]} is not handled; of the windowed models only Swin v1 (timm swin_*) is"
        )
    return default


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in model.layers for block in stage.blocks]


class TimmSwin(TimmViT):
    """timm ``SwinTransformer`` (v1)."""

    name = "timm_swin"

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, SwinTransformer):
            raise _unsupported(model, "not a timm Swin Transformer (v1)")
        if getattr(model, "dynamic_img_size", False):
            raise _unsupported(model, "dynamic image size; export with a fixed --img-size instead")
        pool = getattr(model, "global_pool", "avg")
        if pool != "avg":
            raise _unsupported(model, f"global_pool={pool!r} (the seed is the mean of the last stage's tokens: 'avg' only)")
        blocks = _blocks(model)
        if len(attention_modules(model)) != len(blocks):
            raise _unsupported(model, f"found {len(attention_modules(model))} tappable window attentions for {len(blocks)} blocks")
        for stage in list(model.layers)[1:]:
            if type(stage.downsample).__name__ != "PatchMerging":
                raise _unsupported(model, f"a stage starts with {type(stage.downsample).__name__}, not 2x2 patch merging")
        try:
            WindowedLayout.from_dict(self.windows(model))
        except WindowLayoutError as exc:
            raise _unsupported(model, f"its windows do not form a Swin layout ({exc})") from None

    def layout(self, model: nn.Module) -> TokenLayout:
        patch_embed = model.patch_embed
        return TokenLayout(
            image_size=tuple(int(v) for v in patch_embed.img_size),
            patch_size=tuple(int(v) for v in patch_embed.patch_size),
            grid_size=tuple(int(v) for v in patch_embed.grid_size),
            num_prefix_tokens=0,
        )

    def head_reading(self, model: nn.Module) -> HeadReading:
        return HeadReading(pooling="avg", has_class_token=False)

    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        blocks = _blocks(model)
        return len(blocks), int(blocks[0].attn.num_heads), int(model.embed_dim)

    def windows(self, model: nn.Module) -> dict:
        grids = [tuple(int(v) for v in stage.blocks[0].input_resolution) for stage in model.layers]
        blocks = [
            {
                "stage": index,
                "window": [int(v) for v in block.window_size],
                "shift": [int(v) for v in block.shift_size],
                "heads": int(block.attn.num_heads),
            }
            for index, stage in enumerate(model.layers)
            for block in stage.blocks
        ]
        return {"stage_grids": [list(grid) for grid in grids], "blocks": blocks, "merge": "2x2"}

    def pack(self, model: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
        """Each block's ``[B * windows, heads, a, a]`` (timm orders windows image by image) as
        ``[B, windows * heads * a * a]``, the blocks concatenated: ``[B, packed values]``."""
        layout = WindowedLayout.from_dict(self.windows(model))
        return torch.cat([m.reshape(-1, layout.block_values(i)) for i, m in enumerate(maps)], dim=1)

    def traced(self, model: nn.Module, example_pixels: torch.Tensor):
        """No rewrite: every token of the last stage reaches the (average-pooling) head."""
        return contextlib.nullcontext(False)


SWIN = TimmSwin()
