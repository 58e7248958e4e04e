"""Trace forward + attention gradients of a Vision Transformer into one ONNX graph.

Exporting a module that calls autograd inside ``forward`` fails (or is silently wrong), so the
backward pass is traced first: ``make_fx`` with the core ATen decompositions records the forward
and the ``torch.autograd.grad`` call as one plain graph of ATen ops with a symbolic batch size,
and that graph is what ``torch.onnx.export(dynamo=True)`` translates. The attention
probabilities are captured by the family's taps (for timm, :class:`vit_explain.eager.AttentionRecorder`,
the hooks the eager reference records through), so the graph and the reference read the very
same tensors. The family may rewrite the model while it is traced (timm: the last block on the
tokens the head reads only, :mod:`vit_explain.families.timm_last_block`), which changes no output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch
from torch import nn

from ..eager import AttentionRecorder
from ..families import FAMILIES, ModelFamily
from ..metadata import (
    INPUT_CLASS_WEIGHTS,
    INPUT_PIXELS,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)

__all__ = ["DEFAULT_OPSET", "trace_explain_graph", "export_onnx"]

DEFAULT_OPSET = 20


def _explain_function(model: nn.Module, recorder: AttentionRecorder, family: ModelFamily):
    """``(pixels, class_weights) -> (logits, attentions, d score / d attentions)``, the family's
    score (``sum(logits * w)``)."""

    def explain(pixel_values: torch.Tensor, class_weights: torch.Tensor):
        recorder.reset()
        with torch.enable_grad():
            # The parameters are frozen; the input carries requires_grad so that the attention
            # probabilities are part of an autograd graph. autograd.grad only differentiates the
            # paths that lead to the attentions, so no input or weight gradient is computed.
            pixels = pixel_values.detach().requires_grad_(True)
            logits = model(pixels)
            attentions = list(recorder.attentions)
            score = family.score(logits, class_weights)
            gradients = torch.autograd.grad(score, attentions)
        return logits, family.pack(model, attentions), family.pack(model, list(gradients))

    return explain


def trace_explain_graph(
    model: nn.Module, example_pixels: torch.Tensor, num_outputs: int, family: ModelFamily | None = None
) -> torch.fx.GraphModule:
    """An FX graph of forward + attention gradients with a symbolic batch dimension, through
    ``family``'s taps, score and tracing rewrite (default: timm's)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    family = family or FAMILIES["timm"]
    example_weights = torch.zeros(example_pixels.shape[0], num_outputs)
    with family.attention_recorder(model) as recorder, family.traced(model, example_pixels):
        explain = _explain_function(model, recorder, family)
        return make_fx(
            explain,
            decomposition_table=core_aten_decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,  # the model's parameters become graph constants
        )(example_pixels, example_weights)


def export_onnx(
    graph: torch.fx.GraphModule,
    example_pixels: torch.Tensor,
    num_outputs: int,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 4096,
) -> onnx.ModelProto:
    """Translate the traced graph to ONNX (standard operators only), batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example_weights = torch.zeros(example_pixels.shape[0], num_outputs)
    # torch.onnx prints progress lines (with print) and a few benign warnings (training-mode flag
    # on an FX graph, merged dynamic-axis names); a user exporting a model does not need them.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example_pixels, example_weights),
                input_names=[INPUT_PIXELS, INPUT_CLASS_WEIGHTS],
                output_names=[OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS],
                dynamic_shapes=({0: batch}, {0: batch}),
                dynamo=True,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return program.model_proto

