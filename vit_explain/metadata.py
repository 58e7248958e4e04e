"""What an exported vit-explain model is, as stored inside its ONNX file.

The export stage writes one JSON document into the ONNX model's ``metadata_props``
under :data:`METADATA_KEY`; the runtime reads it back through onnxruntime's
``custom_metadata_map``. It is the single source of truth for preprocessing and token
layout, so the runtime never guesses (no ``sqrt(N - 1)``, no hard-coded 224 or mean/std).

A file may come from another machine or team, so what it says is checked before anything is
sized from it: :meth:`ModelMetadata.check_fields` (each field's type and range, known names),
:meth:`ModelMetadata.check_layout` (the patch grid against input and patch size); the runtime
then checks the rest against the graph itself. A bad field is one :class:`MetadataError` line
that names it, never a traceback or a garbage mask. No torch or onnx here: the runtime needs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelFileError
from .windowing import describe_windows

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
    "INTERPOLATION_NAMES",
    "CROP_MODE_NAMES",
    "POOLINGS",
    "OUTPUT_KINDS",
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


#: timm's eval interpolations the runtime can reproduce (``runtime.preprocess.INTERPOLATIONS``;
#: repeated here because that module needs Pillow, and a test keeps the two equal).
INTERPOLATION_NAMES = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: timm's crop modes (``runtime.preprocess.CROP_MODES``).
CROP_MODE_NAMES = ("center", "squash", "border", "center_floor")
#: How the head pools: timm ``global_pool`` values with one vector per image, and "token+avg" ([CLS, patch mean]).
POOLINGS = ("token", "avg", "avgmax", "max", "token+avg")
OUTPUT_KINDS = ("logits", "features")


class MetadataError(ModelFileError, ValueError):
    """The metadata is missing, malformed, inconsistent or from an incompatible format version.

    A :class:`ModelFileError` so the CLI prints it as one line; still a ``ValueError`` for
    callers that caught it as one before the error hierarchy existed.
    """


def _field_error(name: str, value: Any, problem: str) -> MetadataError:
    """One line naming the field, so whoever edited or produced the file knows what to fix."""
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return MetadataError(f"metadata field '{name}' {problem} (got {shown})")


def _as_tuple(name: str, value: Any) -> tuple:
    """A JSON list as the tuple the dataclasses hold; a string or number there is named, not
    turned into a tuple of characters or a TypeError about iteration."""
    if not isinstance(value, list):
        raise _field_error(name, value, "must be a list")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(name: str, values: Any, count: int) -> None:
    if not (isinstance(values, tuple) and len(values) == count and all(_is_int(v) and v > 0 for v in values)):
        raise _field_error(name, values, f"must be {count} positive integers")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _field_error(name, value, f"must be one of {', '.join(allowed)}")


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
    # The resize before the crop when not timm's floor(size / crop_pct): (short side,) as torchvision
    # Resize(int) / HF shortest_edge, or an exact (height, width) (HF size={height, width}). () = timm's.
    resize_size: tuple[int, ...] = ()

    @property
    def height(self) -> int:
        return self.input_size[1]

    def check(self) -> None:
        """Refuse values that would make preprocessing fail or silently produce garbage: a
        zero std divides by zero, a crop_pct outside (0, 1] crops nonsense, an unknown
        interpolation or crop mode has no faithful reproduction."""
        _positive_ints("preprocess.input_size", self.input_size, 3)
        if self.input_size[0] != 3:
            raise _field_error("preprocess.input_size", self.input_size, "must have 3 channels (RGB)")
        _one_of("preprocess.interpolation", self.interpolation, INTERPOLATION_NAMES)
        _one_of("preprocess.crop_mode", self.crop_mode, CROP_MODE_NAMES)
        size = self.resize_size
        if not (isinstance(size, tuple) and len(size) in (0, 1, 2) and all(_is_int(v) and v > 0 for v in size)):
            raise _field_error("preprocess.resize_size", size, "must be empty, 1 or 2 positive integers")
        if not (_is_number(self.crop_pct) and 0 < self.crop_pct <= 1):
            raise _field_error("preprocess.crop_pct", self.crop_pct, "must be in (0, 1]")
        if not (isinstance(self.mean, tuple) and len(self.mean) == 3 and all(_is_number(v) for v in self.mean)):
            raise _field_error("preprocess.mean", self.mean, "must be 3 finite numbers")
        if not (isinstance(self.std, tuple) and len(self.std) == 3 and all(_is_number(v) and v > 0 for v in self.std)):
            raise _field_error("preprocess.std", self.std, "must be 3 finite numbers > 0")

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
    # The rollout seed as one weight per prefix token, then one for the patch rows' mean
    # (methods.chain.TokenLayout); None (files without it too): derived from has_class_token.
    seed_weights: tuple[float, ...] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # Windowed, hierarchical models (Swin): :func:`vit_explain.windowing.layout_of`; None for a ViT.
    windows: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def check_fields(self) -> None:
        """Each field on its own: types, ranges, known names (see :meth:`PreprocessConfig.check`)."""
        self.preprocess.check()
        _positive_ints("patch_size", self.patch_size, 2)
        _positive_ints("grid_size", self.grid_size, 2)
        if not (_is_int(self.num_prefix_tokens) and self.num_prefix_tokens >= 0):
            raise _field_error("num_prefix_tokens", self.num_prefix_tokens, "must be an integer >= 0")
        if not isinstance(self.has_class_token, bool):
            raise _field_error("has_class_token", self.has_class_token, "must be true or false")
        if self.has_class_token and self.num_prefix_tokens < 1:
            raise _field_error("num_prefix_tokens", self.num_prefix_tokens, "must be >= 1 when has_class_token is true")
        for name in ("num_layers", "num_heads", "num_outputs"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise _field_error(name, getattr(self, name), "must be a positive integer")
        _one_of("output_kind", self.output_kind, OUTPUT_KINDS)
        _one_of("pooling", self.pooling, POOLINGS)
        self._check_seed_weights()
        for name in ("source_model", "weights", "weights_sha256", "package_version"):
            if not isinstance(getattr(self, name), str):
                raise _field_error(name, getattr(self, name), "must be a string")
        if not _is_int(self.opset):
            raise _field_error("opset", self.opset, "must be an integer")
        names = self.class_names
        if not (isinstance(names, tuple) and all(isinstance(n, str) for n in names)):
            raise _field_error("class_names", names, "must be a list of strings")

    def _check_seed_weights(self) -> None:  # values; the count once num_prefix_tokens matched the graph
        w = self.seed_weights
        if w is not None and not (isinstance(w, tuple) and all(_is_number(v) and v >= 0 for v in w) and sum(w) > 0):
            raise _field_error("seed_weights", w, "must be numbers >= 0, not all 0 (prefix tokens, patch mean)")

    def check_seed_count(self) -> None:
        if self.seed_weights is not None and len(self.seed_weights) != self.num_prefix_tokens + 1:
            raise _field_error("seed_weights", self.seed_weights, f"must be {self.num_prefix_tokens + 1} numbers (prefixes, patch mean)")

    def check_class_names(self) -> None:
        """None (the runtime then says "class N") or exactly one name per output: two names for
        384 outputs would label every prediction past the second with a made-up name. Checked
        after ``num_outputs`` is known to match the graph, so the message blames the right field."""
        names = self.class_names
        if names and (self.output_kind != "logits" or len(names) != self.num_outputs):
            expected = f"{self.num_outputs} (one per output)" if self.output_kind == "logits" else "0 (a feature model)"
            raise MetadataError(
                f"metadata field 'class_names' has {len(names)} names, expected {expected} or none"
            )

    def check_layout(self) -> None:
        """The mask's grid is the patch embedding's: ``floor(input size / patch size)`` per axis
        (a convolution with stride = kernel = patch drops the remainder). Anything else would
        reshape the token row into a grid that is not the image's."""
        sizes = self.preprocess.input_size[1:]
        expected = tuple(size // patch for size, patch in zip(sizes, self.patch_size, strict=False))
        if tuple(self.grid_size) != expected:
            raise MetadataError(
                f"metadata field 'grid_size' is {_hw(self.grid_size)}, but input size "
                f"{_hw(self.preprocess.input_size[1:])} / patch size {_hw(self.patch_size)} gives {_hw(expected)}"
            )

    def check(self) -> None:
        """Every check that needs no graph: :meth:`check_fields`, :meth:`check_layout`,
        :meth:`check_class_names`."""
        self.check_fields()
        self.check_layout()
        self.check_class_names()

    def class_name(self, index: int) -> str:
        if 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"{'class' if self.output_kind == 'logits' else 'feature'} {index}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
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
            if not isinstance(pre, dict):
                raise _field_error("preprocess", pre, "must be a JSON object")
            for key in ("input_size", "mean", "std"):
                pre[key] = _as_tuple(f"preprocess.{key}", pre[key])
            if "resize_size" in pre:
                pre["resize_size"] = _as_tuple("preprocess.resize_size", pre["resize_size"])
            raw["preprocess"] = PreprocessConfig(**pre)
            for key in ("patch_size", "grid_size", "class_names"):
                raw[key] = _as_tuple(key, raw[key])
            if raw.get("seed_weights") is not None:
                raw["seed_weights"] = _as_tuple("seed_weights", raw["seed_weights"])
            metadata = cls(**raw)
        except (KeyError, TypeError) as exc:
            raise MetadataError(f"metadata is incomplete or malformed: {exc}") from exc
        metadata.check_fields()
        return metadata

    def describe(self) -> dict[str, Any]:
        """A flat, human-oriented summary (``vit-explain info``)."""
        pre = self.preprocess
        return {
            "source model": self.source_model,
            "weights": self.weights,
            # the hash of the exported parameter tensors (as in the export's parity check), not
            # of the file: the same weights exported twice, or with another opset, keep it
            "parameters sha256": self.weights_sha256,
            "input size": f"{pre.height}x{pre.width}",
            "interpolation": pre.interpolation,
            "crop": _crop_text(pre),
            "mean": list(pre.mean),
            "std": list(pre.std),
            "patch size": f"{self.patch_size[0]}x{self.patch_size[1]}",
            "patch grid": f"{self.grid_size[0]}x{self.grid_size[1]}",
            "prefix tokens": self.num_prefix_tokens,
            "pooling": self.pooling,
            "rollout reads": "mean of the last stage's tokens" if self.windows is not None else self.seed_text(),
            "layers": self.num_layers,
            "heads": self.num_heads,
            **describe_windows(self.windows),
            "outputs": f"{self.num_outputs} {'classes' if self.output_kind == 'logits' else 'features'}",
            "opset": self.opset,
            "format version": self.format_version,
            "exported by": f"vit-explain {self.package_version}",
        }


    def seed_text(self) -> str:
        """The seed in words: "class token row", "mean of patch rows" or a weighted mix."""
        if self.seed_weights is None:
            return "class token row" if self.has_class_token else "mean of patch rows"
        names = ["class token row" if i == 0 and self.has_class_token else f"token {i} row"
                 for i in range(self.num_prefix_tokens)] + ["mean of patch rows"]
        total = sum(self.seed_weights)
        return " + ".join(f"{w / total:g} x {name}" for w, name in zip(self.seed_weights, names, strict=True) if w)


def _crop_text(pre: PreprocessConfig) -> str:
    if not pre.resize_size:
        return f"{pre.crop_mode}, crop_pct={pre.crop_pct}"
    resize = f"short side {pre.resize_size[0]}" if len(pre.resize_size) == 1 else _hw(pre.resize_size)
    return f"resize to {resize}, then {pre.crop_mode} crop"


def _hw(sizes: Any) -> str:
    return "x".join(str(v) for v in sizes)


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
