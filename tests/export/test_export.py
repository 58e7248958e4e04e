"""``export``: what it refuses (with one clear message and no file), how it loads weights, and
what it writes into the artifact.

Refusals must happen before anything is written: a failed export never leaves a model (or a
temporary file) behind that a later ``explain`` could pick up.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tests.helpers.paths import SHARED  # noqa: E402
from vit_explain.eager import weights_sha256  # noqa: E402
from vit_explain.errors import ExportError, ParityError  # noqa: E402
from vit_explain.export import exporter  # noqa: E402
from vit_explain.export.exporter import describe_model, export_model  # noqa: E402
from vit_explain.export.verify import relative_error  # noqa: E402
from vit_explain.families import ModelSpec, build_model  # noqa: E402
from vit_explain.families import timm_vit as loading  # noqa: E402
from vit_explain.metadata import FORMAT_VERSION, OUTPUT_GRADIENTS  # noqa: E402
from vit_explain.reference import TorchReference, one_hot  # noqa: E402
from vit_explain.runtime import Explainer  # noqa: E402
from vit_explain.runtime.session import ModelSession  # noqa: E402

DEIT = "deit_tiny_patch16_224"
SHARED_MODEL = SHARED / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"
SHARED_IMAGES = SHARED / "images"


def files_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def save_checkpoint(state_dict: dict, path: Path) -> Path:
    """A state dict as ``.safetensors`` or ``.pth`` (by suffix), the two formats timm reads."""
    state_dict = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture
def shallow_timm(monkeypatch):
    """Make timm build every model with 2 blocks, so that exports of full-size model *names* (whose
    depth ModelSpec cannot change) stay fast; loading, filtering and resampling are untouched."""
    original = timm.create_model

    def create_model(name, *args, **kwargs):
        kwargs.setdefault("depth", 2)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(loading.timm, "create_model", create_model)


def offline(monkeypatch) -> None:
    """Make huggingface_hub fail at once, as it does with HF_HUB_OFFLINE=1 (no minute of retries)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def deit_weights_are_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("timm/deit_tiny_patch16_224.fb_in1k", "model.safetensors")
    return isinstance(found, str)


def network_is_reachable() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


def test_unknown_model_name(tmp_path):
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match="unknown timm model 'vit_nonexistent_patch16_224'"):
        export_model(ModelSpec("vit_nonexistent_patch16_224", weights="random"), output)
    assert files_in(tmp_path) == []


def test_pretrained_weights_offline_point_to_a_local_checkpoint(tmp_path, monkeypatch):
    """No network: the error says how to go on (``--weights PATH``), never a hub traceback, and
    never silently random weights."""
    if deit_weights_are_cached():
        pytest.skip("the pretrained weights are in the local Hugging Face cache")
    offline(monkeypatch)
    with pytest.raises(ExportError, match=r"--weights PATH") as raised:
        build_model(ModelSpec(DEIT))
    assert "pretrained weights for deit_tiny_patch16_224 could not be loaded" in str(raised.value)
    with pytest.raises(ExportError, match=r"--weights PATH"):
        export_model(ModelSpec(DEIT), tmp_path / "model.onnx")
    assert files_in(tmp_path) == []


@pytest.mark.slow
def test_pretrained_weights_without_network_and_without_offline_mode():
    """What a user without network sees when HF_HUB_OFFLINE is not set: the same message. It takes
    ~50 s on this machine (huggingface_hub retries each of two files 5 times with backoff)."""
    if network_is_reachable():
        pytest.skip("huggingface.co is reachable: this is the offline case")
    if deit_weights_are_cached():
        pytest.skip("the pretrained weights are in the local Hugging Face cache")
    start = time.monotonic()
    with pytest.raises(ExportError, match=r"--weights PATH"):
        build_model(ModelSpec(DEIT))
    elapsed = time.monotonic() - start
    assert elapsed < 180, f"refusing took {elapsed:.0f} s"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    """State dicts that do not fit deit_tiny_patch16_224, built once per module."""
    torch.manual_seed(0)
    full = timm.create_model(DEIT).state_dict()
    with_extra = dict(full, **{"extra.weight": torch.zeros(3)})
    return {
        "shallower": timm.create_model(DEIT, depth=2).state_dict(),
        "extra key": with_extra,
        "other head": timm.create_model(DEIT, num_classes=10).state_dict(),
        "narrower": timm.create_model(DEIT, embed_dim=96, num_heads=3, depth=2).state_dict(),
        "resnet": timm.create_model("resnet18").state_dict(),
        "vit without class token": timm.create_model("vit_medium_patch16_gap_256", depth=1).state_dict(),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize(
    "kind, words",
    [
        pytest.param("shallower", ["missing keys [blocks.2.norm1.weight", "and 116 more]"], id="shallower"),
        pytest.param("extra key", ["unexpected keys [extra.weight]"], id="extra-key"),
        pytest.param("other head", ["size mismatch for head.weight", "--num-classes"], id="other-head"),
        pytest.param("narrower", ["size mismatch for cls_token"], id="narrower"),
        pytest.param(
            "resnet", ["missing keys [cls_token, pos_embed", "and 148 more]", "unexpected keys [", "and 118 more]"],
            id="resnet",
        ),
        pytest.param(
            "vit without class token", ["does not fit"], id="vit-without-class-token",
        ),
    ],
)
def test_checkpoint_that_does_not_fit(kind, words, suffix, checkpoints, tmp_path):
    """One line that names the problem keys and the options to check; no model file."""
    path = save_checkpoint(checkpoints[kind], tmp_path / f"weights{suffix}")
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError) as raised:
        export_model(ModelSpec(DEIT, weights=str(path)), output)
    message = str(raised.value)
    assert f"checkpoint weights{suffix} does not fit VisionTransformer" in message
    for word in words:
        assert word in message, message
    assert "\n" not in message
    assert files_in(tmp_path) == [path]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.pth", None, "checkpoint file not found"),
        ("notes.pth", b"not a checkpoint\n", "cannot read checkpoint"),
        ("garbage.safetensors", b"\x00" * 64, "cannot read checkpoint"),
    ],
    ids=["missing", "text", "garbage"],
)
def test_unreadable_checkpoint(name, content, words, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=words):
        export_model(ModelSpec(DEIT, weights=str(path)), tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out").exists()


def test_attention_pooling_head_is_not_supported_yet(tmp_path, make_test_model):
    """A SigLIP-style ``map`` head attends once more after the blocks; rollout has no place for it."""
    model = make_test_model(
        "vit_base_patch16_siglip_224", depth=1, embed_dim=64, num_heads=2, img_size=32, sharpen=1.0
    )
    assert model.global_pool == "map"
    output = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="not supported yet"):
        export_model(ModelSpec("vit_base_patch16_siglip_224", weights="random"), output, model=model)
    assert files_in(tmp_path) == []


def _reverse_gradient_layers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Append ``Slice(step=-1)`` on the layer axis of the gradient output: the original tool's bug
    (gradients paired with the layers in backward order), made inside the graph."""
    graph = proto.graph
    assert not any(OUTPUT_GRADIENTS in node.input for node in graph.node)
    producer = next(node for node in graph.node if OUTPUT_GRADIENTS in node.output)
    producer.output[list(producer.output).index(OUTPUT_GRADIENTS)] = "gradients_in_layer_order"
    for name, value in [("rev_starts", -1), ("rev_ends", -(2**63)), ("rev_axes", 0), ("rev_steps", -1)]:
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    graph.node.append(
        helper.make_node(
            "Slice", ["gradients_in_layer_order", "rev_starts", "rev_ends", "rev_axes", "rev_steps"], [OUTPUT_GRADIENTS]
        )
    )
    return proto


@pytest.mark.parametrize("fault", ["gradients in backward layer order", "eager weights changed after tracing"])
def test_graph_that_disagrees_with_the_eager_model_is_not_saved(fault, tmp_path, monkeypatch, make_test_model):
    """The parity check is the last gate before writing: a wrong graph raises ParityError, with
    the measured errors in the message, and leaves no file."""
    model = make_test_model(DEIT, depth=2, img_size=32)
    if fault == "gradients in backward layer order":
        real_export = exporter.export_onnx
        monkeypatch.setattr(exporter, "export_onnx", lambda *a, **k: _reverse_gradient_layers(real_export(*a, **k)))
        failing = "gradients"
    else:
        real_check = exporter.check_parity
        changed = make_test_model(DEIT, depth=2, img_size=32)
        with torch.no_grad():
            changed.blocks[1].attn.qkv.weight.mul_(1.01)
        monkeypatch.setattr(exporter, "check_parity", lambda proto, _model, *a: real_check(proto, changed, *a))
        failing = "attentions"
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(ParityError, match=r"disagrees with the PyTorch model, nothing saved") as raised:
        export_model(ModelSpec(DEIT, weights="random"), output, model=model)
    measured, allowed = re.search(rf"{failing} (\S+) \(max (\S+)\)", str(raised.value)).groups()
    assert float(measured) > float(allowed)
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- #
# Local checkpoints
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def source_model():
    """A random deit_tiny (2 blocks, 64 px) standing for a user's trained checkpoint."""
    torch.manual_seed(42)
    model = timm.create_model(DEIT, depth=2, img_size=64).eval()
    with torch.no_grad():  # non-zero biases and class token, so a dropped tensor would show
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name == "cls_token":
                parameter.add_(torch.randn(parameter.shape) * 0.1)
    return model


def test_local_safetensors_checkpoint_round_trip(source_model, shallow_timm, tmp_path):
    """Export from a .safetensors file: the artifact records the file name and the hash of the
    weights actually exported, which are the source model's, and reproduces its logits."""
    path = save_checkpoint(source_model.state_dict(), tmp_path / "my_weights.safetensors")
    result = export_model(ModelSpec(DEIT, weights=str(path), img_size=(64, 64)), tmp_path / "model.onnx")
    meta = ModelSession(result.path, device="cpu").metadata
    assert meta.weights == "my_weights.safetensors"
    assert meta.weights_sha256 == weights_sha256(source_model)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    explanation = Explainer(result.path, device="cpu").explain(pixels.numpy(), method="rollout", discard_ratio=0.0)
    with torch.no_grad():
        expected = source_model(pixels).numpy()
    assert relative_error(explanation.logits, expected) <= 1e-5
    reference = TorchReference(source_model).masks(pixels, "rollout", "max", 0.0)
    np.testing.assert_allclose(explanation.masks, reference.numpy(), rtol=0, atol=1e-5)


def test_local_pth_checkpoint_loads_the_same_weights(source_model, shallow_timm, tmp_path):
    """The same weights from a .pth file give the same model (the export after loading is the
    same code path as the .safetensors round trip above)."""
    path = save_checkpoint(source_model.state_dict(), tmp_path / "my_weights.pth")
    model = build_model(ModelSpec(DEIT, weights=str(path), img_size=(64, 64)))
    assert weights_sha256(model) == weights_sha256(source_model)
    assert all(not p.requires_grad for p in model.parameters())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(pixels), source_model(pixels))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_position_embedding_is_resampled_to_another_image_size(suffix, shallow_timm, tmp_path):
    """A checkpoint saved at 224 (14x14 patches) loaded at 96x128 (6x8): the patch part of the
    position embedding is resampled as timm does (bicubic, antialiased), the class token's entry
    and every other tensor are kept."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(7)
    source = timm.create_model(DEIT, depth=2).eval()
    path = save_checkpoint(source.state_dict(), tmp_path / f"at224{suffix}")
    model = build_model(ModelSpec(DEIT, weights=str(path), img_size=(96, 128)))
    assert tuple(model.patch_embed.grid_size) == (6, 8)
    assert model.pos_embed.shape == (1, 1 + 6 * 8, 192)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(6, 8), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0].detach(), rtol=0, atol=0)
    others = {k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    for name, tensor in model.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(tensor, others[name]), name
    meta = describe_model(model, ModelSpec(DEIT, weights=str(path), img_size=(96, 128)))
    assert meta.grid_size == (6, 8) and meta.preprocess.input_size == (3, 96, 128)


# --------------------------------------------------------------------------- #
# The real DINOv2-S checkpoint from ../shared (developers' machines and CI only)
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason="../shared/models is not present (a user's clone)")
def test_real_dinov2_checkpoint_exports_and_matches_the_reference(tmp_path, compare_masks, parity_record):
    """The one real pretrained ViT reachable offline: 12 blocks, peaky trained attention, layer
    scale, position embedding resampled from 37x37 to 8x8. Masks of the export vs the eager model."""
    spec = ModelSpec("vit_small_patch14_dinov2", weights=str(SHARED_MODEL), img_size=(112, 112), num_classes=0)
    result = export_model(spec, tmp_path / "dinov2.onnx")
    assert result.parity.ok
    explainer = Explainer(result.path, device="cpu")
    meta = explainer.metadata
    assert (meta.grid_size, meta.num_prefix_tokens, meta.output_kind, meta.num_outputs) == ((8, 8), 1, "features", 384)
    assert meta.num_layers == 12 and meta.weights == SHARED_MODEL.name

    images = sorted(SHARED_IMAGES.glob("*.png"))[:2]
    if images:
        pixels = explainer.preprocess(images)
    else:
        pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)).numpy()
    model = build_model(spec)
    reference = TorchReference(model)
    categories = [5, 200][: len(pixels)]
    onnx_outputs = explainer.session.run(pixels, one_hot(categories, len(pixels), 384).numpy())
    eager = reference.outputs(torch.from_numpy(pixels), one_hot(categories, len(pixels), 384))
    row = "dinov2 (real)"
    parity_record(row, "logits", relative_error(onnx_outputs.logits, eager.logits.numpy()))
    parity_record(row, "attentions", relative_error(onnx_outputs.attentions, eager.attentions.numpy()))
    parity_record(row, "gradients", relative_error(onnx_outputs.gradients, eager.gradients.numpy()))
    for method, head_fusion, discard_ratio in [
        ("rollout", "max", 0.0), ("rollout", "max", 0.9), ("grad_rollout", "mean", 0.0), ("grad_rollout", "mean", 0.9),
    ]:
        ours = explainer.explain(
            pixels, method=method, head_fusion=head_fusion, discard_ratio=discard_ratio,
            category_index=categories if method == "grad_rollout" else None,
        ).masks
        theirs = reference.masks(torch.from_numpy(pixels), method, head_fusion, discard_ratio, categories).numpy()
        gradients = method == "grad_rollout"
        bounds = compare_masks(
            onnx_outputs.attentions, onnx_outputs.gradients if gradients else None,
            eager.attentions.numpy(), eager.gradients.numpy() if gradients else None,
            head_fusion, discard_ratio, meta.num_prefix_tokens, meta.has_class_token,
        )
        error = np.abs(ours - theirs).reshape(len(pixels), -1).max(axis=1)
        assert (error <= bounds.tolerance).all(), (method, discard_ratio, error, bounds)
        parity_record(row, "mask max diff", error[bounds.tight].max(initial=0.0))


# --------------------------------------------------------------------------- #
# What the artifact records
# --------------------------------------------------------------------------- #

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

EXPECTED_METADATA = {
    # family: (input size, grid, patch, prefix tokens, class token, layers, heads, outputs, kind, mean/std)
    "deit": ((3, 224, 224), (14, 14), (16, 16), 1, True, 3, 3, 1000, "logits", IMAGENET),
    "deit-seed1": ((3, 112, 112), (7, 7), (16, 16), 1, True, 2, 3, 1000, "logits", IMAGENET),
    "deit-distilled": ((3, 96, 128), (6, 8), (16, 16), 2, True, 2, 3, 1000, "logits", IMAGENET),
    "dinov2-reg4": ((3, 98, 98), (7, 7), (14, 14), 5, True, 2, 6, 384, "features", IMAGENET),
    "vit-gap": ((3, 96, 96), (6, 6), (16, 16), 0, False, 2, 8, 1000, "logits", HALF),
    "beit": ((3, 224, 224), (14, 14), (16, 16), 1, True, 2, 3, 1000, "logits", HALF),
    "eva02": ((3, 112, 112), (8, 8), (14, 14), 1, True, 2, 3, 10, "logits", CLIP),
}


def test_artifact_metadata(family_key, export_family):
    """The runtime reads everything it needs from the file: no sqrt(N - 1), no hard-coded 224."""
    exported = export_family(family_key)
    meta = ModelSession(exported.path, device="cpu").metadata
    size, grid, patch, prefix, class_token, layers, heads, outputs, kind, (mean, std) = EXPECTED_METADATA[family_key]
    assert meta.preprocess.input_size == size
    assert (meta.grid_size, meta.patch_size, meta.num_prefix_tokens, meta.has_class_token) == (grid, patch, prefix, class_token)
    assert meta.num_tokens == prefix + grid[0] * grid[1]
    assert (meta.num_layers, meta.num_heads, meta.num_outputs, meta.output_kind) == (layers, heads, outputs, kind)
    np.testing.assert_allclose(meta.preprocess.mean, mean)
    np.testing.assert_allclose(meta.preprocess.std, std)
    assert meta.preprocess.interpolation == "bicubic"
    assert meta.source_model == exported.family.name
    assert meta.weights == f"random(seed={exported.family.seed})"
    assert meta.weights_sha256 == weights_sha256(exported.model)
    assert meta.format_version == FORMAT_VERSION and meta.opset >= 17
    if outputs == 1000:  # ImageNet-1k heads get timm's class names, offline
        assert len(meta.class_names) == 1000
        assert meta.class_names[0] == "tench, Tinca tinca" and meta.class_names[243] == "bull mastiff"
        assert meta.class_name(243) == "bull mastiff"
    else:
        assert meta.class_names == ()
        assert meta.class_name(3) == ("feature 3" if kind == "features" else "class 3")
