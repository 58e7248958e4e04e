"""Check an exported graph against the eager PyTorch model before anything is saved."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ParityError
from ..metadata import INPUT_CLASS_WEIGHTS, INPUT_COMPUTE_GRADIENTS, INPUT_PIXELS
from ..reference import TorchReference

__all__ = ["TOLERANCES", "ParityReport", "relative_error", "check_parity"]

#: Largest allowed max|onnx - eager| / max|eager| per output. fp32 graphs that compute the
#: same ops in a different order agree to ~1e-6 here; 1e-4 leaves room for deeper models
#: while still catching any wrong pairing, layout or missing term.
TOLERANCES = {"logits": 1e-4, "attentions": 1e-4, "gradients": 1e-4}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| scaled by max |expected| (absolute when expected is all zero)."""
    if actual.shape != expected.shape:
        return float("inf")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


@dataclass(frozen=True)
class ParityReport:
    errors: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.errors[name] <= TOLERANCES[name] for name in TOLERANCES)

    def summary(self) -> str:
        return ", ".join(f"{name} {self.errors[name]:.1e} (max {TOLERANCES[name]:.0e})" for name in TOLERANCES)


def _probe_inputs(input_size: tuple[int, int, int], num_outputs: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, two kinds of class weights: a one-hot (what explain uses) and a dense vector."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, *input_size, generator=generator)
    weights = torch.zeros(2, num_outputs)
    weights[0, int(torch.randint(num_outputs, (1,), generator=generator))] = 1.0
    weights[1] = torch.randn(num_outputs, generator=generator)
    return pixels, weights


def check_parity(model_proto: onnx.ModelProto, model: nn.Module, input_size: tuple[int, int, int], num_outputs: int) -> ParityReport:
    """Run the ONNX graph (onnxruntime, CPU) and the eager model on the same input; raise when they differ."""
    import onnxruntime as ort

    pixels, weights = _probe_inputs(input_size, num_outputs)
    reference = TorchReference(model).outputs(pixels, weights)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits, attentions, gradients = session.run(
        None,
        {INPUT_PIXELS: pixels.numpy(), INPUT_CLASS_WEIGHTS: weights.numpy(), INPUT_COMPUTE_GRADIENTS: np.array(True)},
    )
    report = ParityReport(
        {
            "logits": relative_error(logits, reference.logits.numpy()),
            "attentions": relative_error(attentions, reference.attentions.numpy()),
            "gradients": relative_error(gradients, reference.gradients.numpy()),
        }
    )
    if not report.ok:
        raise ParityError(f"exported graph disagrees with the PyTorch model, nothing saved: {report.summary()}")
    return report
