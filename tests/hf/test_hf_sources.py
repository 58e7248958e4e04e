"""What users type: ``vit-explain export ./folder``, ``hf:ID``, ``torchvision:NAME``, and the
one-line refusals (unsupported model types, offline Hub, folders without a config)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.helpers.hf_models import HF_FAMILIES  # noqa: E402
from vit_explain.cli import main  # noqa: E402


def cli(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_export_a_save_pretrained_folder_then_info_and_explain(tmp_path, monkeypatch):
    """The README's example: a folder in, models/<folder name>.onnx out, explained by class name."""
    folder = HF_FAMILIES["hf-vit"].save(tmp_path / "my-finetuned-vit")
    monkeypatch.chdir(tmp_path)
    result = cli("export", "./my-finetuned-vit")
    assert result.exit_code == 0, result.output
    model = tmp_path / "models" / "my-finetuned-vit.onnx"
    assert result.stdout.strip() == str(model.relative_to(tmp_path)) and model.is_file()
    info = cli("info", model)
    assert info.exit_code == 0 and "rollout reads" in info.output and "class token row" in info.output
    assert "resize to 48x48, then center crop" in info.output
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "photo.png")
    explained = cli("explain", tmp_path / "photo.png", "--model", model, "--category-index", "3", "-o", tmp_path / "out")
    assert explained.exit_code == 0, explained.output
    (report,) = (tmp_path / "out").glob("*.json")
    text = json.loads(report.read_text())
    assert folder.is_dir() and "plane" in json.dumps(text)  # id2label's name for class 3


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (lambda: transformers.Swinv2Config(),
         "'swinv2' is not supported (supported: beit, deit, dinov2, dinov2_with_registers, swin, vit)"),
        (lambda: transformers.CLIPVisionConfig(), "'clip_vision_model' is not supported (supported: beit, deit"),
        (lambda: transformers.ViTConfig(architectures=["ViTForMaskedImageModeling"]),
         "ViTForMaskedImageModeling is not supported (for model type 'vit': ViTModel, ViTForImageClassification)"),
    ],
)
def test_unsupported_transformers_models_are_refused_in_one_line(tmp_path, config, words):
    config().save_pretrained(tmp_path / "model")
    error = one_error_line(cli("export", tmp_path / "model", "-o", tmp_path / "x.onnx"))
    assert words in error
    assert not (tmp_path / "x.onnx").exists()


def test_hub_model_offline_is_one_line_naming_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    error = one_error_line(cli("export", "hf:google/vit-base-patch16-224", "-o", tmp_path / "x.onnx",
                               env={"HF_HOME": str(tmp_path / "hf")}))
    assert "hf:google/vit-base-patch16-224" in error and "vit-explain export ./FOLDER" in error


def test_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    error = one_error_line(cli("export", tmp_path / "weights"))
    assert "without config.json" in error and "save_pretrained" in error


def test_torchvision_sources_are_checked(tmp_path):
    pytest.importorskip("torchvision")
    error = one_error_line(cli("export", "torchvision:vit_x_99", "--weights", "random", "-o", tmp_path / "x.onnx"))
    assert "vit_x_99" in error and "vit_b_16" in error
    bad = tmp_path / "bad.pth"
    import torch

    torch.save({"not": torch.zeros(1)}, bad)
    error = one_error_line(cli("export", "torchvision:vit_b_16", "--weights", bad, "-o", tmp_path / "x.onnx"))
    assert "bad.pth does not fit torchvision's VisionTransformer" in error


def test_torchvision_default_weights_offline_is_one_line(tmp_path):
    pytest.importorskip("torchvision")
    import socket

    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        pass
    else:
        pytest.skip("online: the DEFAULT weights would be downloaded")
    error = one_error_line(cli("export", "torchvision:vit_b_16", "--weights", "DEFAULT", "-o", tmp_path / "x.onnx",
                               env={"TORCH_HOME": str(tmp_path / "torch")}))
    assert "DEFAULT weights for vit_b_16" in error and "--weights PATH" in error


def test_default_output_names():
    from vit_explain.export.exporter import default_output_path
    from vit_explain.families import ModelSpec

    assert str(default_output_path(ModelSpec("hf:google/vit-base-patch16-224", family="hf"))) == \
        "models/vit-base-patch16-224.onnx"
    assert str(default_output_path(ModelSpec("./ft/my-vit/", family="hf"))) == "models/my-vit.onnx"
    assert str(default_output_path(ModelSpec("torchvision:vit_b_16", weights="random", family="torchvision"))) == \
        "models/vit_b_16_random0.onnx"
    assert str(default_output_path(ModelSpec("deit_tiny_patch16_224"))) == "models/deit_tiny_patch16_224.onnx"
