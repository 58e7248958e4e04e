"""KServe's V1 protocol for explanations: the request checked field by field, the answer built.

Why apart from the app: every rule a request must meet (its shape, which fields an instance may
carry, their types, the one settings check, the class range) is plain data in, one error out, and
is tested without a server. Settings go through :func:`vit_explain.methods.resolve_settings`, the
rule the CLI and the Python API use, so a setting refused here is refused there in the same words.
No URL is ever fetched: an image travels in the request as ``{"image_bytes": {"b64": ...}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import VitExplainError
from ..metadata import ModelMetadata
from ..methods import METHOD_NAMES, Settings, SettingsError, resolve_settings

__all__ = ["INSTANCE_FIELDS", "PARAMETER_FIELDS", "Instance", "RequestError", "parse_body", "parse_instances",
           "resolve_instance", "decode_b64"]

#: The fields an instance may carry; ``parameters`` may give every one but the image as a default.
SETTING_FIELDS = ("method", "category_index", "head_fusion", "discard_ratio", "start_layer")
INSTANCE_FIELDS = ("image_bytes", *SETTING_FIELDS)
#: Per-request options that are not explanation settings.
OPTION_FIELDS = ("overlay", "top_k")
PARAMETER_FIELDS = (*SETTING_FIELDS, *OPTION_FIELDS)
DEFAULT_TOP_K = 5


class RequestError(VitExplainError):
    """A request refused: ``status`` is the HTTP code, the message one line for ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the metrics' label, when the status alone does not say it


@dataclass(frozen=True)
class Instance:
    """One instance as the request gave it: its position, its image's base64 text, its settings
    (the request's parameters filled in) and the request's options."""

    index: int
    b64: str
    settings: dict[str, Any]
    overlay: bool
    top_k: int


def parse_body(body: bytes) -> Any:
    """The request body as JSON, or a 400 saying where it breaks."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _unknown(fields: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise RequestError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")


def parse_instances(payload: Any, max_images: int, with_settings: bool = True) -> list[Instance]:
    """The request's instances, each with the request's ``parameters`` as defaults; shape errors
    (400) name the instance by its 0-based index, too many instances is a 413.
    ``with_settings=False`` (``:predict``) accepts images and ``top_k`` only."""
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object with an 'instances' list")
    _unknown(payload, ("instances", "parameters"), "request")
    instances, parameters = payload.get("instances"), payload.get("parameters", {})
    if not isinstance(instances, list) or not instances:
        raise RequestError("'instances' must be a non-empty list")
    if len(instances) > max_images:
        raise RequestError(f"{len(instances)} instances in one request, the limit is {max_images}", 413)
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object")
    settings_allowed = SETTING_FIELDS if with_settings else ()
    _unknown(parameters, (*settings_allowed, *(OPTION_FIELDS if with_settings else ("top_k",))), "parameters")
    overlay = parameters.get("overlay", False)
    if not isinstance(overlay, bool):
        raise RequestError(f"parameters: 'overlay' must be true or false, not {overlay!r}")
    top_k = parameters.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RequestError(f"parameters: 'top_k' must be an integer >= 0, not {top_k!r}")
    defaults = {name: parameters[name] for name in settings_allowed if name in parameters}
    parsed = []
    for index, instance in enumerate(instances):
        where = f"instance {index}"
        if not isinstance(instance, dict):
            raise RequestError(f"{where}: must be a JSON object with 'image_bytes'")
        _unknown(instance, ("image_bytes", *settings_allowed), where)
        image = instance.get("image_bytes")
        if not (isinstance(image, dict) and set(image) == {"b64"} and isinstance(image["b64"], str)):
            raise RequestError(f"{where}: 'image_bytes' must be {{\"b64\": \"<base64 image>\"}} (URLs are not fetched)")
        own = {name: instance[name] for name in settings_allowed if name in instance}
        parsed.append(Instance(index, image["b64"], {**defaults, **own}, overlay, top_k))
    return parsed


def decode_b64(instance: Instance) -> bytes:
    """The instance's image bytes, or a 400 naming it (standard or URL-safe alphabet, padded)."""
    text = instance.b64
    try:
        alphabet = b"-_" if ("-" in text or "_" in text) else None
        return base64.b64decode(text, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"instance {instance.index}: 'image_bytes.b64' is not valid base64 ({exc})") from None


def _check_type(index: int, name: str, value: Any) -> None:
    """Types first: ``resolve_settings`` checks values, and a JSON string where a number belongs
    must be refused by name rather than fail inside the maths."""
    wanted = {
        "method": (str, "a string"), "head_fusion": (str, "a string"),
        "discard_ratio": (numbers.Real, "a number"), "start_layer": (numbers.Integral, "an integer"),
        "category_index": (numbers.Integral, "an integer"),
    }[name]
    if value is None or isinstance(value, bool) or not isinstance(value, wanted[0]):
        raise RequestError(f"instance {index}: '{name}' must be {wanted[1]}, not {json.dumps(value)}")


def resolve_instance(instance: Instance, metadata: ModelMetadata) -> tuple[Settings, int | None]:
    """The instance's settings, defaulted and checked as the CLI does, and its class (or None);
    a 400 naming the instance for anything refused."""
    given = instance.settings
    for name, value in given.items():
        _check_type(instance.index, name, value)
    method = given.get("method")
    if method is not None and method not in METHOD_NAMES:
        raise RequestError(f"instance {instance.index}: unknown method {method!r} (one of {', '.join(METHOD_NAMES)})")
    category = given.get("category_index")
    try:
        settings = resolve_settings(
            method, given.get("head_fusion"), given.get("discard_ratio"), given.get("start_layer", 0),
            has_category=category is not None, refuse_category=True, num_layers=metadata.num_layers,
        )
    except SettingsError as exc:
        raise RequestError(f"instance {instance.index}: {exc}") from None
    if category is not None and not 0 <= int(category) < metadata.num_outputs:
        kind = "classes" if metadata.output_kind == "logits" else "output features"
        raise RequestError(
            f"instance {instance.index}: category_index {category} is out of range: the model has "
            f"{metadata.num_outputs} {kind} (0..{metadata.num_outputs - 1})"
        )
    return settings, None if category is None else int(category)
