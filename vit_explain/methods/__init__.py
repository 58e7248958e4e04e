"""The explanation methods: one record each (:mod:`.registry`), one settings check
(:mod:`.settings`), and their maths, numpy only (:mod:`.relevance` over :mod:`.chain`,
:mod:`.fusion`, :mod:`.selection`). Never torch.

Only the registry is imported here (the settings on first use of their names), so
``vit_explain.methods`` stays cheap for the CLI's ``--help``; import the maths from its modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .registry import (
    CLASS_SPECIFIC_METHODS,
    DEFAULT_DISCARD_RATIO,
    DEFAULT_HEAD_FUSION,
    HEAD_FUSIONS,
    METHOD_NAMES,
    METHODS,
    Method,
    get_method,
)

if TYPE_CHECKING:
    from .settings import Settings, SettingsError, check_start_layer, resolve_for_methods, resolve_settings

_FROM_SETTINGS = ("Settings", "SettingsError", "check_start_layer", "resolve_for_methods", "resolve_settings")


def __getattr__(name: str):
    """The settings' names, imported when first asked for (PEP 562)."""
    if name in _FROM_SETTINGS:
        return getattr(importlib.import_module(".settings", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CLASS_SPECIFIC_METHODS",
    "DEFAULT_DISCARD_RATIO",
    "DEFAULT_HEAD_FUSION",
    "HEAD_FUSIONS",
    "METHOD_NAMES",
    "METHODS",
    "Method",
    "Settings",
    "SettingsError",
    "check_start_layer",
    "get_method",
    "resolve_for_methods",
    "resolve_settings",
]
