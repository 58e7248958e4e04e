"""ONNX graph work shared by export and runtime (onnx + numpy only, never torch).

:mod:`.walk` is the one data-flow walker (what a node reads, what outputs need, prune);
:mod:`.optional_backward` is the export-side variant (the backward pass behind an ``If``) and
:mod:`.variants` the runtime-side ones, derived from the file once per model and session kind.
Both sides read the same walker, so what export writes and what the runtime cuts from it agree.
"""

from .optional_backward import make_gradients_optional
from .variants import (
    FUSED_METHODS,
    FUSED_OUTPUT,
    SessionKind,
    derive,
    forward_only,
    fused_kind,
    fused_maps,
    gradients_inlined,
    per_layer_outputs,
    top1_class_weights,
)
from .walk import needed_nodes, node_reads, prune, topologically_sorted

__all__ = [
    "FUSED_METHODS",
    "FUSED_OUTPUT",
    "SessionKind",
    "derive",
    "forward_only",
    "fused_kind",
    "fused_maps",
    "gradients_inlined",
    "make_gradients_optional",
    "needed_nodes",
    "node_reads",
    "per_layer_outputs",
    "prune",
    "top1_class_weights",
    "topologically_sorted",
]
