"""Shared fixtures: small random timm Vision Transformers, exported once per test session.

Exporting is the slow part of the suite (~9 s for a depth-2 model on a 2-core machine), so the
models are tiny (depth 2-3, small images) and every family is exported at most once per session,
lazily: a test run that selects only one family pays for one export.

Only fixtures and hooks live here (pytest finds them only in conftest.py); the plain helpers they
use, importable by tests too, are in ``tests/helpers/``: ``models`` (making random models
testable, the families), ``masks`` (mask comparison bounds), ``paths`` (the checkout's root).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from tests.helpers.masks import MaskComparison, mask_comparison
from tests.helpers.models import FAMILIES, ExportedModel, Family

#: The one family the quick subset (-m "not slow") runs the per-family tests on.
QUICK_FAMILY = "deit"

if TYPE_CHECKING:  # torch and timm are imported lazily: the runtime tests must run without them
    from torch import nn


@pytest.fixture(scope="session")
def export_family(tmp_path_factory) -> Callable[[str], ExportedModel]:
    """``export_family(key)``: the family exported once per session (on first use), then cached."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec

    cache: dict[str, ExportedModel] = {}
    directory = tmp_path_factory.mktemp("exported")

    def get(key: str) -> ExportedModel:
        if key not in cache:
            family = FAMILIES[key]
            model = family.build()
            path = directory / f"{key}.onnx"
            spec = ModelSpec(family.name, weights="random", seed=family.seed)
            result = export_model(spec, path, model=model)
            cache[key] = ExportedModel(family, path, model, result)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def make_test_model() -> Callable[..., nn.Module]:
    """``make_test_model(name, seed=0, sharpen=4.0, head_gain=3.0, **create_kwargs)``: any timm model,
    prepared like the exported families (testable parameters, sharpened attention, frozen, eval)."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")

    def make(name: str, seed: int = 0, sharpen: float = 4.0, head_gain: float = 3.0, **create_kwargs) -> nn.Module:
        return Family(name, name, create_kwargs, seed=seed, sharpen=sharpen, head_gain=head_gain).build()

    return make


def pytest_generate_tests(metafunc) -> None:
    """A test that takes ``family_key`` runs once per family, with the key as its id. Every family
    but DeiT is marked ``slow``: each costs an export, so ``-m "not slow"`` (the README's quick first
    check) runs the family tests on DeiT alone."""
    if "family_key" in metafunc.fixturenames:
        metafunc.parametrize(
            "family_key",
            [pytest.param(key, marks=() if key == QUICK_FAMILY else pytest.mark.slow) for key in sorted(FAMILIES)],
        )


# --------------------------------------------------------------------------- #
# Comparing masks computed from slightly different tensors
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def compare_masks() -> Callable[..., MaskComparison]:
    """:func:`mask_comparison`, for tests that compare masks computed from different tensors."""
    return mask_comparison


# --------------------------------------------------------------------------- #
# Measured parity, printed at the end of the run (the README's families table)
# --------------------------------------------------------------------------- #

_MEASURED_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def parity_record(request) -> Callable[[str, str, float], None]:
    """``record(family_key, quantity, value)`` keeps the largest value seen per family and quantity."""
    measured = request.config.stash.setdefault(_MEASURED_KEY, {})

    def record(key: str, quantity: str, value: float) -> None:
        row = measured.setdefault(key, {})
        row[quantity] = max(row.get(quantity, 0.0), float(value))

    return record


def pytest_terminal_summary(terminalreporter, config) -> None:
    measured = config.stash.get(_MEASURED_KEY, {})
    if not measured:
        return
    quantities = sorted({q for row in measured.values() for q in row})
    terminalreporter.section("measured ONNX vs eager PyTorch (largest over the cases run)")
    terminalreporter.write_line("family".ljust(16) + "".join(q.rjust(20) for q in quantities))
    for key in sorted(measured):
        cells = "".join(
            (f"{measured[key][q]:.1e}" if q in measured[key] else "-").rjust(20) for q in quantities
        )
        terminalreporter.write_line(key.ljust(16) + cells)
