"""The adapter for Hugging Face transformers Swin (``SwinForImageClassification``, ``SwinModel``).

Loading, the tapped attention and preprocessing are the transformers adapter's
(:class:`~.hf_vit.HFTransformers`): transformers' Swin runs its window attention through the
attention interface, so :func:`~.hf_vit.tapped_eager_attention` sees the scores with the relative
position bias and the shift mask added and taps the post-softmax window probabilities the values
are multiplied by. What differs is the windowed layout (:class:`vit_explain.windowing.WindowedLayout`)
and the packing, as for timm's Swin (:mod:`.timm_swin`), with one difference in the layout:
transformers pads a stage's grid to whole windows *before* the cyclic shift and rolls the padded
grid (``pad_before_shift``), where timm rolls, then pads. The head (the pooler) averages the last
stage's tokens. Swin V2 (``swinv2``) is not in the model-type table and is refused there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ExportError
from ..windowing import WindowedLayout, WindowLayoutError
from .base import HeadReading, TokenLayout
from .hf_types import HFVisionModel
from .hf_vit import HFTaps, HFTransformers

__all__ = ["HFSwin", "HF_SWIN", "is_hf_swin"]


def is_hf_swin(model: nn.Module) -> bool:
    return isinstance(model, HFVisionModel) and model.hf_type.model_type == "swin"


def _swin(model: HFVisionModel) -> nn.Module:
    """The ``SwinModel`` inside (the classifier's ``.swin``, or the backbone itself)."""
    return getattr(model.model, "swin", model.model)


def _blocks(model: HFVisionModel) -> list[nn.Module]:
    return [block for stage in _swin(model).encoder.layers for block in stage.blocks]


class _TokenMean(nn.Module):
    """``AdaptiveAvgPool1d(1)`` on ``[B, C, L]``: the mean over ``L``, kept as a dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1, keepdim=True)


class HFSwin(HFTransformers):
    """transformers Swin (v1), wrapped in :class:`HFVisionModel`."""

    name = "hf_swin"

    def check(self, model: nn.Module) -> None:
        if not is_hf_swin(model):
            raise ExportError(f"{type(model).__name__} is not a wrapped transformers Swin (use wrap_hf_model)")
        height, width = model.image_size
        patch_h, patch_w = model.patch_size
        if height % patch_h or width % patch_w:
            raise ExportError(
                f"transformers Swin pads the input to whole patches: use an input size that is a multiple of {patch_h}x{patch_w}"
            )
        with HFTaps() as taps, torch.no_grad():
            model(torch.zeros(1, 3, height, width))  # also fixes each block's window and shift for this size
        if len(taps.attentions) != len(_blocks(model)):
            raise ExportError(f"{model.class_name}: {len(taps.attentions)} window attentions tapped for {len(_blocks(model))} blocks")
        try:
            WindowedLayout.from_dict(self.windows(model))
        except WindowLayoutError as exc:
            raise ExportError(f"{model.class_name}: its windows do not form a Swin layout ({exc})") from None

    def layout(self, model: nn.Module) -> TokenLayout:
        height, width = model.image_size
        patch_h, patch_w = model.patch_size
        return TokenLayout((height, width), (patch_h, patch_w), (height // patch_h, width // patch_w), 0)

    def head_reading(self, model: nn.Module) -> HeadReading:
        return HeadReading(pooling="avg", has_class_token=False)

    def outputs(self, model: nn.Module) -> tuple[int, str]:
        if model.is_classifier:
            return int(model.model.config.num_labels), "logits"
        return int(_swin(model).num_features), "features"

    def depth(self, model: nn.Module) -> tuple[int, int, int]:
        blocks = _blocks(model)
        return len(blocks), int(blocks[0].attention.num_attention_heads), int(model.model.config.embed_dim)

    def windows(self, model: nn.Module) -> dict:
        """Stage grids from the patch grid (each merge: ``ceil(/2)``); each block's window and shift
        as transformers sets them for this input size (a window no smaller than the grid is
        clamped to it, unshifted), read after a forward pass at that size."""
        height, width = self.layout(model).grid_size
        grids, blocks = [], []
        for index, stage in enumerate(_swin(model).encoder.layers):
            grids.append([height, width])
            for block in stage.blocks:
                window = int(block.window_size)
                if min(height, width) <= window:  # what set_shift_and_window_size does in forward
                    window, shift = min(height, width), 0
                else:
                    shift = int(block.shift_size)
                blocks.append({"stage": index, "window": [window, window], "shift": [shift, shift],
                               "heads": int(block.attention.num_attention_heads)})
            height, width = (height + 1) // 2, (width + 1) // 2
        return {"stage_grids": grids, "blocks": blocks, "merge": "2x2", "pad_before_shift": True}

    @contextlib.contextmanager
    def traced(self, model: nn.Module, example_pixels: torch.Tensor) -> Iterator[bool]:
        """The input's height and width fixed to ints while tracing. The trace is symbolic in every
        input dimension, and transformers' Swin reads its grid from the tensor's shape (timm's from
        ints): left symbolic, every pad, roll and window partition builds a larger sympy expression
        in them, and tracing even a tiny model did not end. The file's input size is fixed, so only
        the batch is left symbolic (a guard on the size, the same graph).

        And the pooler (``AdaptiveAvgPool1d(1)``) as the mean it is: decomposed, its backward
        restrides with ``as_strided_scatter``, which has no ONNX translation."""
        swin = _swin(model)
        embeddings = swin.embeddings
        height, width = model.image_size
        forward = embeddings.forward

        def fixed_size(pixel_values: torch.Tensor, *args, **kwargs):
            torch._check(pixel_values.shape[2] == height)
            torch._check(pixel_values.shape[3] == width)
            return forward(pixel_values, *args, **kwargs)

        pooler = swin.pooler
        with super().traced(model, example_pixels) as rewritten:
            embeddings.forward = fixed_size
            if pooler is not None:
                swin.pooler = _TokenMean()
            try:
                yield rewritten or pooler is not None
            finally:
                del embeddings.forward
                swin.pooler = pooler

    def pack(self, model: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
        """As timm's Swin: each block's ``[B * windows, heads, a, a]`` as ``[B, values]``, concatenated."""
        layout = WindowedLayout.from_dict(self.windows(model))
        return torch.cat([m.reshape(-1, layout.block_values(i)) for i, m in enumerate(maps)], dim=1)


HF_SWIN = HFSwin()
