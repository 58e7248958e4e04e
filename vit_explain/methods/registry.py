"""One record per explanation method: what it needs, which settings it takes, and its maths.

Why one place: a method's facts (class-specific? which head fusions? a discard ratio? a start
layer? can the graph fuse its heads?) used to be written in six modules, one a literal copy kept
in step by a test. Everything that needs them (the settings' checks, the CLI's choices and help,
the Explainer's dispatch, the graph variants, the benchmark) reads them here.

This module imports nothing but the standard library, and little of it: the CLI builds its
``--method`` and ``--head-fusion`` choices from it, and ``vit-explain --help`` must not wait for
numpy (nor for ``dataclasses``: a record is a NamedTuple, as immutable and cheaper to define).
The maths is named by ``"module:function"`` and imported on first use (:attr:`Method.relevance`).

Adding a method: write ``def my_method(maps, settings, layout) -> rows`` in
:mod:`.relevance` (usually a few lines over :func:`.chain.propagate`), then add one
:class:`Method` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # numpy only for the maths' signature
    import numpy as np

    from .chain import LayerMaps, TokenLayout
    from .settings import Settings

__all__ = [
    "HEAD_FUSIONS",
    "DEFAULT_DISCARD_RATIO",
    "Method",
    "METHODS",
    "METHOD_NAMES",
    "CLASS_SPECIFIC_METHODS",
    "DEFAULT_HEAD_FUSION",
    "get_method",
]

#: How a layer's heads become one map: per entry, their mean, min or max.
HEAD_FUSIONS = ("mean", "min", "max")
#: The original tool's discard ratio: the lowest 90% of each fused map are zeroed.
DEFAULT_DISCARD_RATIO = 0.9


class Method(NamedTuple):
    """The facts about one method that callers decide on, and where its maths is."""

    name: str
    summary: str  # one line, for help texts and reports
    class_specific: bool  # explains one output, so the graph must return attention gradients
    head_fusions: tuple[str, ...]  # the fusions it accepts; () where it has no choice
    default_head_fusion: str | None  # None where it has no choice
    default_discard_ratio: float | None  # None where it discards nothing
    uses_start_layer: bool  # propagates through the layers, so the first K may be left out
    fusable_in_graph: bool  # the graph can hand it one head-fused map per layer (graph variants)
    why_unused: str | None  # why it refuses the settings it does not use (said in the error)
    maths: str  # "module:function" under vit_explain.methods: (LayerMaps, Settings, TokenLayout) -> rows
    #: The same for a windowed, hierarchical layout (Swin: :mod:`.windowed`); None where there is none.
    windowed_maths: str | None = None

    @property
    def needs_gradients(self) -> bool:
        return self.class_specific

    @property
    def uses_head_fusion(self) -> bool:
        return bool(self.head_fusions)

    @property
    def uses_discard_ratio(self) -> bool:
        return self.default_discard_ratio is not None

    def uses(self, setting: str) -> bool:
        """Whether it reads ``setting`` (``head_fusion``, ``discard_ratio`` or ``start_layer``)."""
        return {
            "head_fusion": self.uses_head_fusion,
            "discard_ratio": self.uses_discard_ratio,
            "start_layer": self.uses_start_layer,
        }[setting]

    @property
    def relevance(self) -> Callable[[LayerMaps, Settings, TokenLayout], np.ndarray]:
        """The maths: the graph's per-layer maps -> unscaled patch relevance ``[B, patches]``.
        Imported here, on first use, so that reading the registry never imports numpy."""
        return self._import(self.maths)

    def relevance_for(self, windowed: bool) -> Callable:
        """The maths for a model's layout: :attr:`relevance`, or for a windowed layout
        (``metadata.windows``) :attr:`windowed_maths`, which takes a ``WindowedLayout``."""
        if not windowed:
            return self.relevance
        if self.windowed_maths is None:
            raise ValueError(f"{self.name} has no maths for windowed models")
        return self._import(self.windowed_maths)

    @staticmethod
    def _import(maths: str) -> Callable:
        module, function = maths.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)


METHODS: Mapping[str, Method] = MappingProxyType({
    method.name: method
    for method in (
        Method(
            "rollout", "attention rollout (Abnar & Zuidema 2020): every layer's fused attention, chained",
            class_specific=False, head_fusions=HEAD_FUSIONS, default_head_fusion="max",
            default_discard_ratio=DEFAULT_DISCARD_RATIO, uses_start_layer=True, fusable_in_graph=True,
            why_unused=None, maths="relevance:rollout", windowed_maths="windowed:rollout",
        ),
        Method(
            "grad_rollout", "gradient rollout: attention x its gradient for one class, clamped at 0, chained",
            class_specific=True, head_fusions=HEAD_FUSIONS, default_head_fusion="mean",
            default_discard_ratio=DEFAULT_DISCARD_RATIO, uses_start_layer=True, fusable_in_graph=True,
            why_unused=None, maths="relevance:grad_rollout", windowed_maths="windowed:grad_rollout",
        ),
        Method(
            "gae", "GAE (Chefer et al. 2021): the positive part of gradient x attention, averaged over heads, chained",
            class_specific=True, head_fusions=(), default_head_fusion=None,
            default_discard_ratio=None, uses_start_layer=True, fusable_in_graph=True,
            why_unused="GAE averages the positive part of gradient x attention over the heads and discards nothing",
            maths="relevance:gae", windowed_maths="windowed:gae",
        ),
        Method(
            "attention", "the last layer's attention from the class token, heads fused: no propagation",
            class_specific=False, head_fusions=HEAD_FUSIONS, default_head_fusion="mean",
            default_discard_ratio=None, uses_start_layer=False, fusable_in_graph=False,
            why_unused="last-layer attention reads the last layer alone, with nothing discarded",
            maths="relevance:attention", windowed_maths="windowed:attention",
        ),
    )
})
#: The names in their order (the CLI's choices, evaluate's default set).
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
#: Methods that explain one output (class) and so need the attention gradients.
CLASS_SPECIFIC_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.class_specific)
#: Each method's default head fusion (None: no choice).
DEFAULT_HEAD_FUSION: Mapping[str, str | None] = MappingProxyType(
    {m.name: m.default_head_fusion for m in METHODS.values()}
)


def get_method(name: str) -> Method:
    """The record for ``name``, or a ValueError listing the methods."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, not {name!r}") from None
