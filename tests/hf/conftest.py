"""Fixtures for the transformers and torchvision families: each small model saved as a
``save_pretrained`` folder, loaded back through the adapter (the route ``vit-explain export
./folder`` takes) and exported once per session, lazily."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.hf_models import HF_FAMILIES, QUICK_HF_FAMILIES


@dataclass
class ExportedHF:
    key: str
    folder: Path
    path: Path
    model: Any  # the adapter's wrapped eager model (HFVisionModel)
    result: Any  # ExportResult

    @property
    def metadata(self):
        return self.result.metadata


@pytest.fixture(scope="session")
def export_hf(tmp_path_factory) -> Callable[[str], ExportedHF]:
    """``export_hf(key)``: the family saved, loaded from its folder and exported (once)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import FAMILIES, ModelSpec

    cache: dict[str, ExportedHF] = {}
    directory = tmp_path_factory.mktemp("hf")

    def get(key: str) -> ExportedHF:
        if key not in cache:
            family = HF_FAMILIES[key]
            folder = family.save(directory / key)
            spec = ModelSpec(str(folder), weights="pretrained", family="hf", img_size=family.img_size)
            model = FAMILIES["hf"].build(spec)
            path = directory / f"{key}.onnx"
            cache[key] = ExportedHF(key, folder, path, model, export_model(spec, path, model=model))
        return cache[key]

    return get


def pytest_generate_tests(metafunc) -> None:
    """``hf_key`` runs once per transformers family; all but the quick ones are ``slow``."""
    if "hf_key" in metafunc.fixturenames:
        metafunc.parametrize(
            "hf_key",
            [pytest.param(key, marks=() if key in QUICK_HF_FAMILIES else pytest.mark.slow) for key in HF_FAMILIES],
        )
