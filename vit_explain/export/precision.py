"""``--precision fp16``: the checked float32 graph converted to float16, kept only within stated bounds.

Why a conversion of the ONNX file (onnxruntime's ``float16`` converter) rather than an export of
the model in half: the float32 graph has already passed the parity check against eager PyTorch,
so the float16 file is compared with that graph alone, on the same inputs, by the runtime that
will run it. Inputs and outputs stay float32 (the runtime's interface and its float64 maths do
not change); LayerNormalization stays float32 (its float16 form fails onnxruntime's type checks,
and its statistics are where half precision loses most).

The bounds (:data:`MASK_BOUND`, :data:`TOP1_AGREEMENT`) are checked on seeded inputs for rollout
and gradient rollout at their defaults; a conversion that misses them is refused, with the figures.
A float16 file needs a provider with float16 kernels: onnxruntime's CPU provider runs these
graphs (no faster than float32 there), CUDA is where they pay.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import ExportError, first_line
from ..graph.walk import topologically_sorted
from ..metadata import METADATA_KEY, ModelMetadata

__all__ = ["PRECISIONS", "MASK_BOUND", "TOP1_AGREEMENT", "HalfParity", "to_float16", "check_half", "convert_checked"]

PRECISIONS = ("fp32", "fp16")
#: The largest difference from the float32 file's masks (each scaled to max 1) a float16 file may
#: show on the check inputs. float16 keeps 11 bits of mantissa, as TF32 does, which the README
#: measured to move masks by up to ~0.1 through the discard threshold.
MASK_BOUND = 0.1
#: The share of check inputs whose top-1 class must be the float32 file's.
TOP1_AGREEMENT = 1.0
_CHECK_METHODS = ("rollout", "grad_rollout")


@dataclass(frozen=True)
class HalfParity:
    """The float16 file against the float32 one on the check inputs."""

    mask_max_diff: dict[str, float]  # per method
    top1_agreement: float
    logits_max_diff: float
    images: int

    def holds(self) -> bool:
        return max(self.mask_max_diff.values()) <= MASK_BOUND and self.top1_agreement >= TOP1_AGREEMENT

    def summary(self) -> str:
        masks = ", ".join(f"{m} {d:.1e}" for m, d in self.mask_max_diff.items())
        return (f"float16 vs float32 on {self.images} inputs: masks {masks} (bound {MASK_BOUND}), "
                f"top-1 agreement {self.top1_agreement:.0%}, logits {self.logits_max_diff:.1e}")


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph in float16 with float32 inputs and outputs, nodes in topological order (the
    converter appends the input casts at the end, which the graph walker would not follow)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converter_log = logging.getLogger("onnxruntime.transformers.float16")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # its warnings print whole nodes; it handles what they name
    try:
        half = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "LayerNormalization"]
        )
    finally:
        converter_log.setLevel(level)
    graph = half.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    ordered = topologically_sorted(list(graph.node), available)
    del graph.node[:]
    graph.node.extend(ordered)
    return half


def with_precision(metadata: ModelMetadata, parity: HalfParity) -> ModelMetadata:
    """The metadata of the float16 file: its precision and the measured bounds, in ``extra``."""
    extra = {**metadata.extra, "precision": {"dtype": "fp16", **dataclasses.asdict(parity)}}
    return dataclasses.replace(metadata, extra=extra)


def check_half(full: onnx.ModelProto, half: onnx.ModelProto, metadata: ModelMetadata, batch: int = 4) -> HalfParity:
    """Both files explained by the runtime on the same seeded inputs (a different class per image
    for gradient rollout); an ExportError when the float16 file cannot run here or misses the bounds."""
    from ..runtime import Explainer

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((batch, *metadata.preprocess.input_size)).astype(np.float32)
    categories = [int(c) for c in rng.choice(metadata.num_outputs, size=batch, replace=batch > metadata.num_outputs)]
    with tempfile.TemporaryDirectory(prefix="vit-explain-fp16-") as directory:
        paths = []
        for name, proto in (("fp32", full), ("fp16", half)):
            paths.append(Path(directory) / f"{name}.onnx")
            onnx.save(proto, str(paths[-1]))
        try:
            with Explainer(paths[0], threads=1) as single, Explainer(paths[1], threads=1) as halved:
                results = {
                    method: (single.explain(pixels, method=method, category_index=chosen),
                             halved.explain(pixels, method=method, category_index=chosen))
                    for method, chosen in (("rollout", None), ("grad_rollout", categories))
                }
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for a missing float16 kernel vary
            raise ExportError(f"the float16 graph cannot run on this machine's onnxruntime ({first_line(exc)})") from None
    want, got = results["rollout"]
    parity = HalfParity(
        {m: float(np.abs(a.masks - b.masks).max()) for m, (a, b) in results.items()},
        # a feature model has no classes: its top-1 is not checked (its masks are)
        float(np.mean(want.logits.argmax(axis=1) == got.logits.argmax(axis=1))) if metadata.output_kind == "logits" else 1.0,
        float(np.abs(want.logits - got.logits).max()),
        batch,
    )
    if not parity.holds():
        raise ExportError(f"--precision fp16 refused: {parity.summary()}")
    return parity


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Replace the file's metadata document (in place)."""
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: metadata.to_json()}
    )


def convert_checked(full: onnx.ModelProto, metadata: ModelMetadata) -> tuple[onnx.ModelProto, ModelMetadata, HalfParity]:
    """The float16 file of the checked float32 graph ``full``, its metadata and measured bounds;
    an ExportError when the bounds do not hold."""
    half = to_float16(full)
    parity = check_half(full, half, metadata)
    metadata = with_precision(metadata, parity)
    set_metadata(half, metadata)
    return half, metadata, parity
