"""The one place settings are defaulted and checked, for the Python API, the CLI and evaluate.

Why one function: the CLI and ``Explainer`` each applied the rules before, in two copies that
had to agree word for word. Errors are :class:`SettingsError` (a ValueError) naming the
settings at fault, so the CLI can say the same sentence with its flag names
(:meth:`SettingsError.message_for`) and point at the right option. No numpy here: the CLI checks
flags before anything heavy is imported.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .registry import CLASS_SPECIFIC_METHODS, METHODS, Method, get_method

__all__ = ["Settings", "SettingsError", "check_start_layer", "resolve_settings", "resolve_for_methods"]

#: The settings a method may or may not use, in the order errors name them.
OPTIONAL_SETTINGS = ("head_fusion", "discard_ratio", "start_layer")


class SettingsError(ValueError):
    """A setting refused, with the reason.

    ``template`` holds ``{names}`` where the settings at fault are named; ``str(error)`` spells
    them as Python parameters, :meth:`message_for` as the caller likes (the CLI: as flags).
    ``blame`` is the setting to point at: the method itself when it is the method that does not
    take a setting that was given."""

    def __init__(self, template: str, names: Sequence[str], blame: str, joiner: str = " and ") -> None:
        self.template, self.names, self.blame, self.joiner = template, tuple(names), blame, joiner
        super().__init__(self.message_for(str))

    def message_for(self, spell: Callable[[str], str]) -> str:
        return self.template.format(names=self.joiner.join(spell(name) for name in self.names))


@dataclass(frozen=True)
class Settings:
    """What one explanation computes, defaulted and checked: a setting the method does not use
    is ``None`` (``start_layer`` 0), so a record never claims a setting that had no effect."""

    method: str
    head_fusion: str | None
    discard_ratio: float | None
    start_layer: int = 0

    @property
    def record(self) -> Method:
        return METHODS[self.method]


def check_start_layer(start_layer: object, num_layers: int) -> int:
    """``start_layer`` as an int in ``[0, num_layers)``, or a SettingsError saying what is allowed."""
    if isinstance(start_layer, bool) or not isinstance(start_layer, numbers.Integral):
        raise SettingsError(f"start layer must be an integer, not {start_layer!r}", (), "start_layer")
    if not 0 <= int(start_layer) < num_layers:
        raise SettingsError(
            f"start layer must be in 0..{num_layers - 1} (the model has {num_layers} layers), not {start_layer}",
            (), "start_layer",
        )
    return int(start_layer)


def resolve_settings(
    method: str | None = None,
    head_fusion: str | None = None,
    discard_ratio: float | None = None,
    start_layer: int = 0,
    *,
    has_category: bool = False,
    refuse_category: bool = False,
    num_layers: int | None = None,
) -> Settings:
    """Defaults as the original tool (a category means gradient rollout), then the checks.

    A setting the method does not use is refused with the reason: silently dropping it would
    record and report a map computed differently from what the caller asked for.
    ``refuse_category``: a category for a method that explains no class is refused too (the CLI,
    whose file names would name a class the map does not explain; the Python API lets evaluate
    pass one category to every method). ``num_layers``: None checks all but the start layer's
    range (the CLI, before the model is opened).
    """
    method = method or ("grad_rollout" if has_category else "rollout")
    record = get_method(method)
    if refuse_category and has_category and not record.class_specific:
        raise SettingsError(
            f"{{names}} applies to {' and '.join(CLASS_SPECIFIC_METHODS)}, not {method}", ("category_index",), "method"
        )
    given = {"head_fusion": head_fusion is not None, "discard_ratio": discard_ratio is not None, "start_layer": start_layer != 0}
    unused = [name for name in OPTIONAL_SETTINGS if given[name] and not record.uses(name)]
    if unused:
        verb = "do" if len(unused) > 1 else "does"
        raise SettingsError(f"{{names}} {verb} not apply to {method}: {record.why_unused}", unused, "method")
    if record.uses_head_fusion:
        head_fusion = head_fusion or record.default_head_fusion
        if head_fusion not in record.head_fusions:
            raise SettingsError(
                f"head fusion must be one of {', '.join(record.head_fusions)}, not {head_fusion!r}", (), "head_fusion"
            )
    if record.uses_discard_ratio:
        discard_ratio = record.default_discard_ratio if discard_ratio is None else float(discard_ratio)
        if not 0.0 <= discard_ratio < 1.0:
            raise SettingsError(f"discard ratio must be in [0, 1), not {discard_ratio}", (), "discard_ratio")
    if not record.uses_start_layer:
        start_layer = 0
    elif num_layers is not None:
        start_layer = check_start_layer(start_layer, num_layers)
    return Settings(method, head_fusion, discard_ratio, start_layer)


def resolve_for_methods(
    methods: Sequence[str],
    head_fusion: str | None = None,
    discard_ratio: float | None = None,
    start_layer: int = 0,
    num_layers: int | None = None,
) -> dict[str, Settings]:
    """Settings for several methods at once (evaluate): each setting goes to the methods that
    use it, and one that none of them uses is refused, as it would change nothing."""
    records = [get_method(name) for name in methods]
    given = {"head_fusion": head_fusion is not None, "discard_ratio": discard_ratio is not None, "start_layer": start_layer != 0}
    unused = [name for name in OPTIONAL_SETTINGS if given[name] and not any(r.uses(name) for r in records)]
    if unused:
        # one sentence for all of them, as the CLI has always said it
        raise SettingsError(f"{{names}} does not apply to {' or '.join(methods)}", unused, "method", ", ")
    return {
        r.name: resolve_settings(
            r.name,
            head_fusion if r.uses_head_fusion else None,
            discard_ratio if r.uses_discard_ratio else None,
            start_layer if r.uses_start_layer else 0,
            num_layers=num_layers,
        )
        for r in records
    }
