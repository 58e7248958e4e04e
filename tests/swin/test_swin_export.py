"""A Swin exported, then explained by the runtime, against eager timm and the dense oracle.

- Graph parity: logits, every block's window attentions and their gradients from onnxruntime
  against eager timm (two input seeds, batches of 1 and 3, a different class per image).
- The Explainer's masks (every method, fusion, discard 0 / 0.5 / 0.9) against the dense float64
  oracle run on the graph's own tensors (1e-5), and at discard 0 on eager timm's tensors (1e-5).
- The commands: ``explain`` writes first-stage-grid masks, ``info`` shows the stages,
  ``evaluate`` runs; a file whose windowed layout contradicts itself or its graph is refused with
  one line; Swin V2 is refused at export with one line.

The 80 px two-stage model is exported once (the quick subset); the 88 px three-stage one is
marked slow.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.helpers.swin_reference import dense_swin_rows, eager_maps, scaled
from tests.swin.models import CONFIGS

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from vit_explain.cli import main  # noqa: E402
from vit_explain.errors import ExportError, ModelFileError  # noqa: E402
from vit_explain.export.exporter import export_model  # noqa: E402
from vit_explain.families import ModelSpec  # noqa: E402
from vit_explain.metadata import METADATA_KEY  # noqa: E402
from vit_explain.runtime import Explainer  # noqa: E402
from vit_explain.windowing import layout_of  # noqa: E402

TOLERANCE = 1e-5
METHOD_CASES = [
    (method, fusion, discard)
    for method in ("rollout", "grad_rollout")
    for fusion in ("mean", "min", "max")
    for discard in (0.0, 0.5, 0.9)
] + [("gae", None, None), ("attention", "mean", None), ("attention", "max", None)]


@pytest.fixture(scope="module", params=[pytest.param("padded"), pytest.param("three-stage", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    family = CONFIGS[request.param]
    model = family.build()
    path = tmp_path_factory.mktemp("swin") / f"{family.key}.onnx"
    result = export_model(ModelSpec(family.name, weights="random", seed=family.seed), path, model=model)
    explainer = Explainer(path, device="cpu", threads=1)
    yield request.param, model, path, result, explainer
    explainer.close()


def _pixels(model, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


def _weights(classes: list[int]) -> torch.Tensor:
    weights = torch.zeros(len(classes), 10)
    weights[torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    return weights


def _relative(actual, expected) -> float:
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale


def test_the_file_describes_its_windows(exported):
    key, model, _, result, _ = exported
    layout = layout_of(result.metadata)
    assert layout is not None and result.metadata.num_prefix_tokens == 0 and not result.metadata.has_class_token
    assert layout.stage_grids[0] == tuple(model.patch_embed.grid_size) == result.metadata.grid_size
    assert len(layout.blocks) == sum(len(stage.blocks) for stage in model.layers) == result.metadata.num_layers
    assert result.parity.ok


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_matches_eager_timm(exported, seed, batch, parity_record):
    key, model, _, _, explainer = exported
    pixels, weights = _pixels(model, batch, seed), _weights([2, 7, 4][:batch])
    logits, attentions, gradients = eager_maps(model, pixels, weights)
    graph = explainer.session.run_layers(pixels.numpy(), weights.numpy())
    parity_record(f"swin-{key}", "logits", _relative(graph.logits, logits))
    assert _relative(graph.logits, logits) <= TOLERANCE
    assert len(graph.attentions) == len(attentions) == len(graph.gradients)
    for name, ours_all, theirs_all in (("attentions", graph.attentions, attentions), ("gradients", graph.gradients, gradients)):
        for ours, theirs in zip(ours_all, theirs_all, strict=True):
            assert ours.shape == theirs.shape
            parity_record(f"swin-{key}", name, _relative(ours, theirs))
            assert _relative(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("method, fusion, discard", METHOD_CASES)
def test_explainer_masks_match_the_dense_reference(exported, method, fusion, discard, parity_record):
    key, model, _, _, explainer = exported
    for batch, classes in ((1, [5]), (3, [1, 8, 3])):
        pixels = _pixels(model, batch, 20 + batch)
        class_specific = method in ("grad_rollout", "gae")
        result = explainer.explain(
            pixels.numpy(), method=method, head_fusion=fusion, discard_ratio=discard,
            category_index=classes if class_specific else None,
        )
        graph = explainer.session.run_layers(pixels.numpy(), _weights(classes).numpy())
        reference = dense_swin_rows(model, graph.attentions, graph.gradients, method, result.head_fusion, discard or 0.0)
        grid = model.patch_embed.grid_size
        assert result.masks.shape == (batch, *grid) and result.masks.dtype == np.float32
        error = np.abs(result.masks - scaled(reference).reshape(batch, *grid)).max()
        parity_record(f"swin-{key}", "masks (graph tensors)", error)
        assert error <= TOLERANCE
        if not discard:  # no discard boundary for float noise to cross: eager tensors too
            _, attentions, gradients = eager_maps(model, pixels, _weights(classes))
            eager = dense_swin_rows(model, attentions, gradients, method, result.head_fusion, 0.0)
            error = np.abs(result.masks - scaled(eager).reshape(batch, *grid)).max()
            parity_record(f"swin-{key}", "masks (eager, discard 0)", error)
            assert error <= TOLERANCE


def test_a_batch_of_three_equals_each_image_alone_and_graph_fusion_is_not_used(exported):
    _, model, path, _, explainer = exported
    pixels = _pixels(model, 3, 5).numpy()
    together = explainer.explain(pixels, method="grad_rollout", category_index=[1, 2, 3])
    for item in range(3):
        alone = explainer.explain(pixels[item : item + 1], method="grad_rollout", category_index=[item + 1])
        np.testing.assert_allclose(together.masks[item], alone.masks[0], atol=1e-6)
    with Explainer(path, device="cpu", fuse_in_graph=True) as fused:  # windowed: raw maps, same masks
        assert not fused.fuse_in_graph
        expected = explainer.explain(pixels, method="rollout").masks
        np.testing.assert_allclose(fused.explain(pixels, method="rollout").masks, expected, atol=1e-6)


def _photo(tmp_path, size=(120, 90)):
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(gradient).save(path)
    return path


def test_commands_explain_info_and_evaluate(exported, tmp_path):
    key, model, path, _, _ = exported
    if key != "padded":
        pytest.skip("the commands are the same for every configuration")
    photo = _photo(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["explain", str(photo), "--model", str(path), "-o", str(tmp_path / "out"), "--method", "gae"])
    assert result.exit_code == 0, result.output
    mask = np.load(next((tmp_path / "out").glob("*.npy")))
    assert mask.shape == tuple(model.patch_embed.grid_size) and mask.max() == 1.0
    with Image.open(next((tmp_path / "out").glob("*.png"))) as overlay:
        assert overlay.size == (120, 90)
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["grid_size"] == list(model.patch_embed.grid_size)

    info = runner.invoke(main, ["info", str(path)])
    assert info.exit_code == 0, info.output
    fields = dict(re.match(r"\s*([^:]+):\s(.*)", line).groups() for line in info.stdout.splitlines())
    assert fields["windowed stages"].startswith("20x20 (2 blocks, window 6x6, shift 0x0/3x3, heads 2) -> 10x10")
    assert fields["rollout reads"] == "mean of the last stage's tokens"

    evaluation = runner.invoke(main, ["evaluate", str(photo), "--model", str(path), "--steps", "2", "-o", str(tmp_path / "eval"), "-q"])
    assert evaluation.exit_code == 0, evaluation.output
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert "gae" in json.dumps(rows) and "random" in json.dumps(rows)


def _rewrite_windows(path, tmp_path, change) -> str:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            meta = json.loads(prop.value)
            change(meta["windows"])
            prop.value = json.dumps(meta)
    target = tmp_path / "edited.onnx"
    onnx.save(model, str(target))
    with pytest.raises(ModelFileError) as error:
        Explainer(target, device="cpu")
    return str(error.value)


def test_a_windowed_layout_that_contradicts_itself_or_the_graph_is_refused(exported, tmp_path):
    key, _, path, _, _ = exported
    if key != "padded":
        pytest.skip("one file is enough")
    message = _rewrite_windows(path, tmp_path, lambda w: w["stage_grids"].__setitem__(1, [9, 10]))
    assert "'windows'" in message and "2x2 merge" in message and "\n" not in message
    message = _rewrite_windows(path, tmp_path, lambda w: w["blocks"][1].__setitem__("shift", [6, 6]))
    assert "shift" in message and "\n" not in message
    message = _rewrite_windows(path, tmp_path, lambda w: w["blocks"][3].__setitem__("heads", 5))
    assert "'windows'" in message and "attention values per image" in message


def test_swin_v2_and_other_windowed_models_are_refused_with_one_line(tmp_path):
    import timm

    for name, kwargs in (
        ("swinv2_tiny_window8_256", dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=4)),
        ("maxvit_tiny_tf_224", dict(img_size=64)),
    ):
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        with pytest.raises(ExportError) as error:
            export_model(ModelSpec(name, weights="random"), tmp_path / "refused.onnx", model=model)
        assert "is not supported yet" in str(error.value) and "Swin v1" in str(error.value)
        assert not (tmp_path / "refused.onnx").exists()
    result = CliRunner().invoke(main, ["export", "swinv2_tiny_window8_256", "--weights", "random", "-o", str(tmp_path / "v2.onnx")])
    assert result.exit_code != 0
    assert "Swin V2" in result.output and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()[-1:]) == 1 and "Swin V2" in result.stderr.strip().splitlines()[-1]
