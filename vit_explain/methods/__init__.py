"""The explanation methods: one record each (:mod:`.registry`), one settings check
(:mod:`.settings`), and their maths, numpy only (:mod:`.relevance` over :mod:`.chain`,
:mod:`.fusion`, :mod:`.selection`). Never torch.

Only the registry and the settings are imported here, so ``vit_explain.methods`` stays cheap for
the CLI; import the maths from its modules.
"""

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
from .settings import Settings, SettingsError, check_start_layer, resolve_for_methods, resolve_settings

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
