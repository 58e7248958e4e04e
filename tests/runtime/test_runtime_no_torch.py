"""The runtime stands alone: no torch, no timm, and clear errors for files that are not its models.

Services embed ``vit_explain.runtime`` next to other frameworks, so it must not import torch or
timm even where they are installed (a fresh interpreter checks ``sys.modules``), and it must work
where they are not (the same run with their import blocked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers.paths import REPO_ROOT as REPO
from vit_explain.errors import ModelFileError
from vit_explain.metadata import FORMAT_VERSION, METADATA_KEY
from vit_explain.runtime import Explainer

#: Run in a fresh interpreter: explain with both methods, then report what got imported.
#: With BLOCK, importing torch or timm raises ImportError as on a machine without them.
SCRIPT = r"""
import importlib.abc, json, sys

BLOCKED = ("torch", "timm")
if sys.argv[2] == "block":
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())

import numpy as np
from PIL import Image
from vit_explain.runtime import Explainer

explainer = Explainer(sys.argv[1], device="cpu")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8))
rollout = explainer.explain([image, image], method="rollout")
gradient = explainer.explain([image], method="grad_rollout", category_index=3)
imported = sorted(m for m in BLOCKED if m in sys.modules)
try:  # the control: is torch importable in this interpreter at all?
    import torch  # noqa: F401
    torch_importable = True
except ImportError:
    torch_importable = False
print(json.dumps({
    "rollout": list(rollout.masks.shape),
    "grad_rollout": list(gradient.masks.shape),
    "max": float(rollout.masks.max()),
    "imported": imported,
    "torch_importable": torch_importable,
}))
"""


@pytest.fixture(scope="module")
def model_file(export_family) -> Path:
    """An exported model (the non-square distilled DeiT: 2 prefix tokens, 6x8 grid)."""
    return export_family("deit-distilled").path


@pytest.mark.parametrize("torch_available", ["installed", "block"])
def test_runtime_explains_without_importing_torch_or_timm(torch_available, model_file):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_file), torch_available],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"] == [], f"the runtime imported {report['imported']}"
    assert report["rollout"] == [2, 6, 8] and report["grad_rollout"] == [1, 6, 8]
    assert report["max"] == 1.0
    if torch_available == "block":
        assert not report["torch_importable"]


# --------------------------------------------------------------------------- #
# Files that are not vit-explain models
# --------------------------------------------------------------------------- #


def identity_model(metadata: str | None = None) -> onnx.ModelProto:
    """A valid ONNX model that is not a vit-explain export (optionally with our metadata key)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: metadata})
    return model


def open_model(path: Path) -> str:
    """The ModelFileError message for ``path`` (fails the test if the file opens)."""
    with pytest.raises(ModelFileError) as raised:
        Explainer(path, device="cpu")
    message = str(raised.value)
    assert str(path) in message and "\n" not in message and "Traceback" not in message
    return message


def test_missing_file(tmp_path):
    assert "model file not found" in open_model(tmp_path / "nowhere.onnx")


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    assert "is not a readable ONNX model" in open_model(path)


def test_onnx_model_that_is_not_a_vit_explain_export(tmp_path):
    path = tmp_path / "identity.onnx"
    onnx.save(identity_model(), path)
    message = open_model(path)
    assert "not a vit-explain export" in message and "vit-explain export MODEL_NAME" in message


def test_malformed_metadata(tmp_path):
    path = tmp_path / "broken.onnx"
    onnx.save(identity_model("{not json"), path)
    assert "metadata is not valid JSON" in open_model(path)


def test_vit_explain_metadata_on_a_foreign_graph(tmp_path, model_file):
    """Valid metadata copied onto a graph without our inputs and outputs."""
    metadata = {p.key: p.value for p in onnx.load(model_file, load_external_data=False).metadata_props}
    path = tmp_path / "transplant.onnx"
    onnx.save(identity_model(metadata[METADATA_KEY]), path)
    assert "do not match vit-explain's interface" in open_model(path)


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_model(fraction, tmp_path, model_file):
    """A download or copy cut short, including by a single kilobyte."""
    data = model_file.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert "is not a readable ONNX model" in open_model(path)


def test_model_from_a_newer_vit_explain(tmp_path, model_file):
    """A real export whose metadata says format_version + 1: refused with the advice to upgrade."""
    model = onnx.load(model_file)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            document = json.loads(prop.value)
            document["format_version"] = FORMAT_VERSION + 1
            prop.value = json.dumps(document)
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    message = open_model(path)
    assert f"model format version {FORMAT_VERSION + 1} is not supported" in message
    assert "newer vit-explain: upgrade it" in message


def test_the_untouched_export_opens(model_file):
    """The control for the tests above: the file they were made from is fine."""
    explainer = Explainer(model_file, device="cpu")
    pixels = np.zeros((1, *explainer.metadata.preprocess.input_size), dtype=np.float32)
    assert explainer.explain(pixels, method="rollout").masks.shape == (1, 6, 8)
