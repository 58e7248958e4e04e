"""Model files from elsewhere: what a file says about itself is checked before it is used.

Exported files travel between machines and teams. Each bad file here is a valid small export
(the distilled DeiT: 96x128 input, patch 16, 6x8 grid, 2 prefix tokens, 2 layers, 3 heads, 1000
classes) with one metadata field edited, as a careless edit or a foreign tool would. Loading it
must fail with one :class:`ModelFileError` line that names the field (the CLI: exit code 1, one
``Error:`` line, no traceback), never a traceback later, a 112 GiB allocation or a garbage mask.
A file whose weights live outside its own folder (external data) is refused too.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from vit_explain.cli import main
from vit_explain.errors import ModelFileError, VitExplainError
from vit_explain.metadata import (
    INTERPOLATION_NAMES,
    METADATA_KEY,
    MetadataError,
    ModelMetadata,
    PreprocessConfig,
)
from vit_explain.runtime import Explainer
from vit_explain.runtime.session import ModelSession

FAMILY = "deit-distilled"


@pytest.fixture(scope="module")
def valid(export_family) -> Path:
    return export_family(FAMILY).path


def edited(source: Path, folder: Path, field: str, value: Any) -> Path:
    """A copy of ``source`` whose metadata field ``field`` (``a.b`` for nested) is ``value``."""
    model = onnx.load(str(source))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    document = json.loads(prop.value)
    *parents, leaf = field.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    prop.value = json.dumps(document)
    path = folder / f"{field}.onnx"
    onnx.save(model, str(path))
    return path


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], result.output


#: (field, edited value): each is refused, and the message names the field.
BAD_FIELDS = [
    ("grid_size", [100000, 100000]),  # was a traceback in the mask reshape
    ("grid_size", [6, 7]),  # 128 / 16 is 8
    ("num_prefix_tokens", -5),  # was a traceback
    ("num_prefix_tokens", 3),  # 3 + 48 tokens, the graph has 50
    ("num_prefix_tokens", True),
    ("preprocess.input_size", [3, 100000, 100000]),  # was a 112 GiB allocation
    ("preprocess.input_size", [3, 96, 112]),  # the graph takes 96x128
    ("preprocess.input_size", [1, 96, 128]),
    ("preprocess.std", [0, 0, 0]),  # was accepted: division by zero, inf pixels
    ("preprocess.std", [0.2, -0.2, 0.2]),
    ("preprocess.mean", [0.5, "grey", 0.5]),
    ("preprocess.crop_pct", -1),  # was accepted
    ("preprocess.crop_pct", 0),
    ("preprocess.crop_pct", 1.5),
    ("preprocess.interpolation", "magic"),
    ("preprocess.crop_mode", "diagonal"),
    ("class_names", ["cat", "dog"]),  # was accepted: names for 2 of 1000 outputs
    ("num_outputs", 384),
    ("num_layers", 5),
    ("num_heads", 7),
    ("num_heads", 0),
    ("output_kind", "probabilities"),
    ("pooling", "attention"),
    ("has_class_token", "yes"),
    ("grid_size", "6x8"),  # was a tuple of characters
    ("preprocess.mean", 0.5),  # was a TypeError about iteration, no field named
    ("weights_sha256", 12345),
    ("seed_weights", [0.5, 0.5, 0, 0]),  # 4 weights for 2 prefix tokens + the patch mean
    ("seed_weights", [0, 0, 0]),  # a seed of nothing: an all-zero mask
    ("seed_weights", [1, -1, 1]),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v}"[:40] for f, v in BAD_FIELDS])
def test_a_bad_metadata_field_is_refused_at_load(valid, tmp_path, field, value):
    bad = edited(valid, tmp_path, field, value)
    with pytest.raises(ModelFileError) as caught:
        ModelSession(bad, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and f"'{field}'" in message and str(bad) in message, message


@pytest.mark.parametrize("field, value", [
    ("grid_size", [100000, 100000]),
    ("num_prefix_tokens", -5),
    ("preprocess.input_size", [3, 100000, 100000]),
    ("preprocess.std", [0, 0, 0]),
    ("class_names", ["cat", "dog"]),
    ("num_heads", 7),
])
def test_the_cli_says_it_in_one_line(valid, tmp_path, field, value):
    bad = edited(valid, tmp_path, field, value)
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    out = tmp_path / "out"
    assert_one_error_line(cli("info", bad), f"'{field}'")
    assert_one_error_line(cli("explain", image, "--model", bad, "-o", out), f"'{field}'")
    assert not out.exists()


def test_a_huge_input_size_is_refused_before_any_allocation(valid, tmp_path):
    """100000 px per side was 112 GiB of pixels for one image; now nothing is sized from it."""
    bad = edited(valid, tmp_path, "preprocess.input_size", [3, 100000, 100000])
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="preprocess.input_size"):
            Explainer(bad, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB traced while refusing the file"


def test_the_untouched_export_still_opens(valid, tmp_path):
    """The control: the file every bad one was edited from, re-saved the same way, is fine."""
    same = edited(valid, tmp_path, "weights", json.loads(_metadata(valid))["weights"])
    session = ModelSession(same, device="cpu")
    assert session.metadata.grid_size == (6, 8) and session.metadata.num_tokens == 50
    assert "parameters sha256" in session.metadata.describe()


def _metadata(path: Path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return next(p.value for p in model.metadata_props if p.key == METADATA_KEY)


# --------------------------------------------------------------------------- #
# Checks that need no graph
# --------------------------------------------------------------------------- #


def _meta(input_hw: tuple[int, int], patch: int, grid: tuple[int, int]) -> ModelMetadata:
    return ModelMetadata(
        source_model="test", weights="random(seed=0)", weights_sha256="0" * 64,
        preprocess=PreprocessConfig(input_size=(3, *input_hw)), patch_size=(patch, patch), grid_size=grid,
        num_prefix_tokens=1, has_class_token=True, num_layers=1, num_heads=1, num_outputs=10,
        output_kind="logits", opset=20, package_version="0",
    )


def test_the_grid_may_drop_the_patch_embedding_remainder():
    """A 100x230 input with patch 16 is a 6x14 grid: the stride-16 convolution drops the rest."""
    _meta((100, 230), 16, (6, 14)).check()
    with pytest.raises(MetadataError, match="'grid_size' is 7x14.*gives 6x14"):
        _meta((100, 230), 16, (7, 14)).check()


def test_metadata_error_is_a_model_file_error_and_still_a_value_error():
    assert issubclass(MetadataError, ModelFileError) and issubclass(MetadataError, VitExplainError)
    assert issubclass(MetadataError, ValueError)
    with pytest.raises(MetadataError, match="not valid JSON"):
        ModelMetadata.from_json("{")


def test_known_interpolations_are_the_ones_preprocessing_reproduces():
    from vit_explain.metadata import CROP_MODE_NAMES
    from vit_explain.runtime.preprocess import CROP_MODES, INTERPOLATIONS

    assert set(INTERPOLATION_NAMES) == set(INTERPOLATIONS) and set(CROP_MODE_NAMES) == set(CROP_MODES)


# --------------------------------------------------------------------------- #
# External data: weights stored in files beside the model
# --------------------------------------------------------------------------- #


def _with_external_data(source: Path, folder: Path) -> Path:
    """``source`` saved as ``folder/model.onnx`` with its weights in ``folder/weights.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(onnx.load(str(source)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return path


def _relocated(model_path: Path, destination: Path, location: str) -> Path:
    """A copy of ``model_path`` in ``destination`` whose external data entries all say ``location``."""
    model = onnx.load(str(model_path), load_external_data=False)
    count = 0
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                count += 1
    assert count > 0
    destination.mkdir(parents=True, exist_ok=True)
    path = destination / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_external_data_in_the_model_folder_is_used(valid, tmp_path):
    """The control: weights beside the model load, and give the very logits of the one-file model."""
    external = _with_external_data(valid, tmp_path / "model")
    assert onnx.load(str(external), load_external_data=False).graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    pixels = np.random.default_rng(0).standard_normal((1, 3, 96, 128)).astype(np.float32)
    expected = ModelSession(valid, device="cpu").run(pixels).logits
    np.testing.assert_array_equal(ModelSession(external, device="cpu").run(pixels).logits, expected)


@pytest.mark.parametrize("how", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(valid, tmp_path, how):
    elsewhere = _with_external_data(valid, tmp_path / "elsewhere")
    weights = elsewhere.parent / "weights.bin"
    folder = tmp_path / "received"
    if how == "absolute":
        bad = _relocated(elsewhere, folder, str(weights))
    elif how == "parent":
        bad = _relocated(elsewhere, folder, os.path.join("..", "elsewhere", "weights.bin"))
    else:
        bad = _relocated(elsewhere, folder, "weights.bin")
        (folder / "weights.bin").symlink_to(weights)
    with pytest.raises(ModelFileError, match="not a file inside the model's own folder") as caught:
        ModelSession(bad, device="cpu")
    assert "\n" not in str(caught.value)
    assert_one_error_line(cli("info", bad), "model's own folder")
