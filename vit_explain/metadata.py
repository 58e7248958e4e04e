"""What an exported vit-explain model is, as stored inside its ONNX file.

The export stage writes one JSON document into the ONNX model's ``metadata_props``
under :data:`METADATA_KEY`; the runtime reads it back through onnxruntime's
``custom_metadata_map``. It is the single source of truth for preprocessing and token
layout, so the runtime never guesses (no ``sqrt(N - 1)``, no hard-coded 224 or mean/std).

This module imports neither torch nor onnx: the runtime depends on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "INPUT_PIXELS",
    "INPUT_CLASS_WEIGHTS",
    "INPUT_COMPUTE_GRADIENTS",
    "OUTPUT_LOGITS",
    "OUTPUT_ATTENTIONS",
    "OUTPUT_GRADIENTS",
    "PreprocessConfig",
    "ModelMetadata",
    "MetadataError",
    "parse_img_size",
]

#: Bumped whenever the graph interface or this document changes incompatibly.
FORMAT_VERSION = 1
METADATA_KEY = "vit_explain"

INPUT_PIXELS = "pixel_values"
INPUT_CLASS_WEIGHTS = "class_weights"
INPUT_COMPUTE_GRADIENTS = "compute_gradients"
OUTPUT_LOGITS = "logits"
OUTPUT_ATTENTIONS = "attentions"
OUTPUT_GRADIENTS = "attention_gradients"


class MetadataError(ValueError):
    """The metadata is missing, malformed or from an incompatible format version."""


@dataclass(frozen=True)
class PreprocessConfig:
    """timm's eval transform parameters (``timm.data.resolve_model_data_config``).

    ``input_size`` is ``(channels, height, width)``.
    """

    input_size: tuple[int, int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the runtime needs to know about an exported model."""

    source_model: str
    weights: str  # "pretrained", "random(seed=N)" or the checkpoint file name
    weights_sha256: str  # hash of the exported parameters, for provenance
    preprocess: PreprocessConfig
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]  # (grid_h, grid_w): the mask's shape
    num_prefix_tokens: int  # class + distillation + register tokens, in front of the patches
    # True when the head reads the class token (token pooling): rollout starts from its row.
    # False for models without one and for those that pool the patch tokens (BEiT, EVA, *_gap_*):
    # rollout then starts from the mean of the patch tokens' rows.
    has_class_token: bool
    num_layers: int
    num_heads: int
    num_outputs: int  # classes, or feature width for a model without a classifier head
    output_kind: str  # "logits" or "features"
    opset: int
    package_version: str
    class_names: tuple[str, ...] = ()
    pooling: str = "token"  # timm's global_pool: "token", "avg", "avgmax" or "max"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def class_name(self, index: int) -> str:
        if 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"{'class' if self.output_kind == 'logits' else 'feature'} {index}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"metadata is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise MetadataError("metadata is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            hint = " (made by a newer vit-explain: upgrade it)" if newer else " (re-export the model)"
            raise MetadataError(
                f"model format version {version!r} is not supported, this vit-explain reads "
                f"version {FORMAT_VERSION}{hint}"
            )
        try:
            pre = raw.pop("preprocess")
            pre["input_size"] = tuple(pre["input_size"])
            pre["mean"] = tuple(pre["mean"])
            pre["std"] = tuple(pre["std"])
            raw["preprocess"] = PreprocessConfig(**pre)
            for key in ("patch_size", "grid_size", "class_names"):
                raw[key] = tuple(raw[key])
            return cls(**raw)
        except (KeyError, TypeError) as exc:
            raise MetadataError(f"metadata is incomplete or malformed: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """A flat, human-oriented summary (``vit-explain info``)."""
        pre = self.preprocess
        return {
            "source model": self.source_model,
            "weights": self.weights,
            "weights sha256": self.weights_sha256,
            "input size": f"{pre.height}x{pre.width}",
            "interpolation": pre.interpolation,
            "crop": f"{pre.crop_mode}, crop_pct={pre.crop_pct}",
            "mean": list(pre.mean),
            "std": list(pre.std),
            "patch size": f"{self.patch_size[0]}x{self.patch_size[1]}",
            "patch grid": f"{self.grid_size[0]}x{self.grid_size[1]}",
            "prefix tokens": self.num_prefix_tokens,
            "pooling": self.pooling,
            "rollout reads": "class token row" if self.has_class_token else "mean of patch rows",
            "layers": self.num_layers,
            "heads": self.num_heads,
            "outputs": f"{self.num_outputs} {'classes' if self.output_kind == 'logits' else 'features'}",
            "opset": self.opset,
            "format version": self.format_version,
            "exported by": f"vit-explain {self.package_version}",
        }


def parse_img_size(text: str | None) -> tuple[int, int] | None:
    """``"384"`` -> (384, 384); ``"224x320"`` -> (224, 320) (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image size {text!r} is not N or HxW (for example 384 or 224x320)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"image size {text!r} is not N or HxW (for example 384 or 224x320)")
    return sizes[0], sizes[1]
