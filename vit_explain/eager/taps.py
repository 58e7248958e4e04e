"""A recorder for attention code that hands its probabilities to a tap before using them.

timm's attention passes its probabilities through an ``attn_drop`` module, so forward hooks can
read them (:class:`~.hooks.AttentionRecorder`). Hugging Face transformers' eager attention is a
function and torchvision's blocks call ``nn.MultiheadAttention(need_weights=False)``, which
returns no probabilities at all (and, asked for them, returns an average over heads computed
beside the output, not the tensor the output is made from). Their adapters therefore run
attention code that calls :meth:`ProbabilityTaps.tap` with the post-softmax probabilities and
multiplies the values by *what the tap returns*: the recorded tensor is the one the output
depends on, so its gradient is the attention gradient (tests check it against finite
differences, through :attr:`ProbabilityTaps.edit`).

Subclasses install and remove their attention code in :meth:`_install` / :meth:`_remove`; the
interface (``reset``, ``attentions``, ``gradients``, a context manager) is the one tracing and
the reference use for every family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

__all__ = ["ProbabilityTaps"]

#: ``edit(layer, probabilities) -> probabilities``: a test's perturbation of one layer's map.
Edit = Callable[[int, torch.Tensor], torch.Tensor]


class ProbabilityTaps(contextlib.AbstractContextManager):
    """Every layer's post-softmax probabilities ``[B, heads, N, N]`` in call order (layer order),
    and with ``capture_gradients`` their gradients by layer after a backward pass."""

    def __init__(self, capture_gradients: bool = False) -> None:
        self.capture_gradients = capture_gradients
        self.attentions: list[torch.Tensor] = []
        self.gradients: dict[int, torch.Tensor] = {}
        #: Tests only: replaces each layer's probabilities before they are recorded and used.
        self.edit: Edit | None = None

    def __enter__(self) -> ProbabilityTaps:
        self._install()
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _install(self) -> None:
        """Make the model's attention call :meth:`tap` (subclasses)."""

    def _remove(self) -> None:
        """Undo :meth:`_install`, leaving the model as it was (subclasses)."""

    def reset(self) -> None:
        self.attentions = []
        self.gradients = {}

    def tap(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Record one layer's probabilities; the attention code must use the returned tensor."""
        layer = len(self.attentions)
        if self.edit is not None:
            probabilities = self.edit(layer, probabilities)
        self.attentions.append(probabilities)
        if self.capture_gradients and probabilities.requires_grad:
            # The hook holds the dict, not the recorder (see hooks.AttentionRecorder: a hook in the
            # tensor's C++ autograd data would otherwise keep the recorder and every map alive).
            gradients = self.gradients

            def store(grad: torch.Tensor, layer: int = layer) -> None:
                gradients[layer] = grad

            probabilities.register_hook(store)
        return probabilities
