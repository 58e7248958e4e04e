"""Check an exported graph against the eager PyTorch model before anything is saved.

The check must fit in memory wherever the export itself does: at a ViT-S/14's native 518 px one
image's attentions (or their gradients) are ``12 x 6 x 1370^2`` floats, ~540 MB per kind, and the
eager reference, onnxruntime's intermediates and a float64 comparison each hold several such
arrays. So the probe images run in pieces of ``batch_size`` (one image each for large models), the
outputs are compared layer by layer, and onnxruntime's arena is off so that what one piece freed
goes back to the system before the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ParityError
from ..families import ModelFamily
from ..metadata import INPUT_CLASS_WEIGHTS, INPUT_COMPUTE_GRADIENTS, INPUT_PIXELS
from ..reference import TorchReference

__all__ = ["TOLERANCES", "PROBE_IMAGES", "ParityReport", "relative_error", "check_parity"]

#: Largest allowed max|onnx - eager| / max|eager| per output. fp32 graphs that compute the
#: same ops in a different order agree to ~1e-6 here; 1e-4 leaves room for deeper models
#: while still catching any wrong pairing, layout or missing term.
TOLERANCES = {"logits": 1e-4, "attentions": 1e-4, "gradients": 1e-4}

#: Images in the probe: one with a one-hot class weight (what explain uses), one with a dense one.
PROBE_IMAGES = 2


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| scaled by max |expected| (absolute when expected is all zero)."""
    error = _Error()
    error.add(actual, expected)
    return error.value


@dataclass
class _Error:
    """:func:`relative_error` gathered over pieces (images, layers): the largest difference and the
    largest reference value seen, so that no piece needs the whole array at once."""

    diff: float = 0.0
    scale: float = 0.0
    mismatched: bool = False

    def add(self, actual: np.ndarray, expected: np.ndarray) -> None:
        if actual.shape != expected.shape:
            self.mismatched = True
        elif expected.size:
            self.scale = max(self.scale, float(np.max(np.abs(expected))))
            self.diff = max(self.diff, float(np.max(np.abs(actual.astype(np.float64) - expected))))

    @property
    def value(self) -> float:
        if self.mismatched:
            return float("inf")
        return self.diff / self.scale if self.scale > 0 else self.diff


@dataclass(frozen=True)
class ParityReport:
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.errors[name] <= TOLERANCES[name] for name in TOLERANCES)

    def summary(self) -> str:
        return ", ".join(f"{name} {self.errors[name]:.1e} (max {TOLERANCES[name]:.0e})" for name in TOLERANCES)


def _probe_inputs(input_size: tuple[int, int, int], num_outputs: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, two kinds of class weights: a one-hot (what explain uses) and a dense vector."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(PROBE_IMAGES, *input_size, generator=generator)
    weights = torch.zeros(PROBE_IMAGES, num_outputs)
    weights[0, int(torch.randint(num_outputs, (1,), generator=generator))] = 1.0
    weights[1] = torch.randn(num_outputs, generator=generator)
    return pixels, weights


def _session(model_proto: onnx.ModelProto):
    """A CPU session that returns freed memory at once: with the arena (and the memory pattern
    planned for the first run's shapes) a piece would keep the previous piece's peak reserved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _pieces(pixels: torch.Tensor, weights: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, pixels.shape[0], batch_size):
        yield pixels[start : start + batch_size], weights[start : start + batch_size]


def _compare_piece(session, reference: TorchReference, pixels: torch.Tensor, weights: torch.Tensor, errors: dict[str, _Error]) -> None:
    """Run one piece through both and fold its errors in, one layer at a time (a float64 copy of
    every layer at once would be the largest array of the whole export)."""
    eager = reference.outputs(pixels, weights)
    logits, attentions, gradients = session.run(
        None,
        {INPUT_PIXELS: pixels.numpy(), INPUT_CLASS_WEIGHTS: weights.numpy(), INPUT_COMPUTE_GRADIENTS: np.array(True)},
    )
    errors["logits"].add(logits, eager.logits.numpy())
    for name, actual, expected in (("attentions", attentions, eager.attentions), ("gradients", gradients, eager.gradients)):
        if actual.shape != tuple(expected.shape):
            errors[name].mismatched = True
            continue
        for layer in range(actual.shape[0]):
            errors[name].add(actual[layer], expected[layer].numpy())


def check_parity(
    model_proto: onnx.ModelProto,
    model: nn.Module,
    input_size: tuple[int, int, int],
    num_outputs: int,
    batch_size: int = PROBE_IMAGES,
    family: ModelFamily | None = None,
) -> ParityReport:
    """Run the ONNX graph (onnxruntime, CPU) and the eager model on the same probe images, in
    pieces of ``batch_size`` images; raise when they differ.

    A piece of two images also checks that the graph keeps batch items apart; one image per piece
    halves the memory for models where that matters more.
    """
    pixels, weights = _probe_inputs(input_size, num_outputs)
    reference = TorchReference(model, family)
    session = _session(model_proto)
    errors = {name: _Error() for name in TOLERANCES}
    for piece_pixels, piece_weights in _pieces(pixels, weights, batch_size):
        _compare_piece(session, reference, piece_pixels, piece_weights, errors)
    report = ParityReport({name: error.value for name, error in errors.items()})
    if not report.ok:
        raise ParityError(f"exported graph disagrees with the PyTorch model, nothing saved: {report.summary()}")
    return report
