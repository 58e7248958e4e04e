"""The explanation methods: GAE, raw attention and ``start_layer``, against independent full-matrix maths.

The engine computes only the class token's row (vector x matrix, last layer first); the
implementations here build the whole ``N x N`` relevance matrix with the paper's forward
recurrence, so a wrong layer order, a head fused before clamping or a wrong start row shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from vit_explain.methods import DEFAULT_HEAD_FUSION, HEAD_FUSIONS, SettingsError, check_start_layer, resolve_settings
from vit_explain.methods import METHOD_NAMES as METHODS
from vit_explain.methods.registry import METHODS as RECORDS
from vit_explain.methods.relevance import (
    attention_masks,
    attention_rows,
    gae_masks,
    gae_rows,
    rollout_masks,
    rollout_rows,
)
from vit_explain.methods.settings import resolve_for_methods
from vit_explain.runtime import Explainer

# --------------------------------------------------------------------------- #
# Independent full-matrix implementations
# --------------------------------------------------------------------------- #


def full_gae(attentions, gradients, num_prefix_tokens=1, has_class_token=True, start_layer=0):
    """Chefer et al. (2021) literally: R = I; for each layer in order R = R + mean_h(max(G*A, 0)) @ R."""
    attentions = np.asarray(attentions, dtype=np.float64)
    gradients = np.asarray(gradients, dtype=np.float64)
    layers, batch, _, tokens, _ = attentions.shape
    relevance = np.broadcast_to(np.eye(tokens), (batch, tokens, tokens)).copy()
    for layer in range(start_layer, layers):
        cam = np.clip(gradients[layer] * attentions[layer], 0.0, None).mean(axis=1)
        relevance = relevance + cam @ relevance
    if has_class_token:
        return relevance[:, 0, num_prefix_tokens:]
    return relevance[:, num_prefix_tokens:, num_prefix_tokens:].mean(axis=1)


def full_attention(attentions, head_fusion="mean", num_prefix_tokens=1, has_class_token=True):
    fused = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](np.asarray(attentions[-1], np.float64), axis=1)
    if has_class_token:
        return fused[:, 0, num_prefix_tokens:]
    return fused[:, num_prefix_tokens:, num_prefix_tokens:].mean(axis=1)


def random_attention(rng, layers=4, batch=3, heads=2, tokens=10, peaky=3.0):
    logits = rng.normal(size=(layers, batch, heads, tokens, tokens)) * peaky
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    attentions = exp / exp.sum(axis=-1, keepdims=True)
    gradients = rng.normal(size=attentions.shape)
    return attentions.astype(np.float32), gradients.astype(np.float32)


def unit_max(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / rows.max(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #


def test_methods_are_listed():
    assert METHODS == ("rollout", "grad_rollout", "gae", "attention")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_full_matrix_recurrence_on_random_attention(seed):
    attentions, gradients = random_attention(np.random.default_rng(seed))
    expected = full_gae(attentions, gradients)
    np.testing.assert_allclose(gae_rows(attentions, gradients, 1), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("prefix", "has_class_token"), [(2, True), (0, False), (2, False)])
def test_gae_token_layouts(prefix, has_class_token):
    """Distillation/register tokens in front, and models without a class token (mean of patch rows)."""
    attentions, gradients = random_attention(np.random.default_rng(7), tokens=11)
    expected = full_gae(attentions, gradients, prefix, has_class_token)
    got = gae_rows(attentions, gradients, prefix, has_class_token)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_gae_hand_made_order():
    """Two layers, one head, unit gradients (so Abar_l = A_l), worked out by hand.

    R = (I + A2)(I + A1): row 0 of (I + A2) is [1.5, 0, 0.5]; times (I + A1) gives
    1.5 * [1.5, 0.5, 0] + 0.5 * [0, 0, 2] = [2.25, 0.75, 1.0]. The wrong order,
    (I + A1)(I + A2), gives [2.25, 1.0, 0.75], so the test tells the two apart.
    """
    a1 = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = np.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    attentions = np.stack([a1, a2])[:, None, None]  # [L=2, B=1, H=1, 3, 3]
    gradients = np.ones_like(attentions)
    np.testing.assert_allclose(gae_rows(attentions, gradients, 1), [[0.75, 1.0]])
    np.testing.assert_allclose(full_gae(attentions, gradients), [[0.75, 1.0]])
    # The recurrence and the explicit product agree (checks the reference implementation itself).
    product = (np.eye(3) + a2) @ (np.eye(3) + a1)
    np.testing.assert_allclose(product[0, 1:], [0.75, 1.0])
    wrong = (np.eye(3) + a1) @ (np.eye(3) + a2)
    assert not np.allclose(wrong[0, 1:], [0.75, 1.0])
    np.testing.assert_allclose(gae_masks(attentions, gradients, 1, (1, 2)), [[[0.75, 1.0]]])


def test_gae_clamps_each_head_before_averaging():
    """mean(max(G*A, 0)) over heads, not max(mean(G*A), 0): a negative head must not cancel a positive one."""
    attention = np.array([[0.0, 1.0], [0.0, 1.0]])
    attentions = np.stack([attention, attention])[None, None]  # [L=1, B=1, H=2, 2, 2]
    gradients = np.stack([np.ones((2, 2)), -np.ones((2, 2))])[None, None]
    # Head 1 contributes 1 to R[0, 1], head 2 is clamped to 0: mean 0.5 (fusing first would give 0).
    np.testing.assert_allclose(gae_rows(attentions, gradients, 1), [[0.5]])


def test_gae_with_negative_gradients_only_is_zero_and_its_mask_is_not_nan():
    attentions, gradients = random_attention(np.random.default_rng(3))
    masks = gae_masks(attentions, -np.abs(gradients), 1, (3, 3))
    assert masks.dtype == np.float32 and masks.shape == (3, 3, 3)
    assert np.all(masks == 0)


def test_gae_masks_are_scaled_rows():
    attentions, gradients = random_attention(np.random.default_rng(4), tokens=7)
    masks = gae_masks(attentions, gradients, 1, (2, 3))
    np.testing.assert_allclose(masks.reshape(3, 6), unit_max(full_gae(attentions, gradients)), rtol=1e-6)
    assert masks.max(axis=(1, 2)) == pytest.approx(1.0)


def test_gae_needs_gradients_of_the_same_shape():
    attentions, gradients = random_attention(np.random.default_rng(5))
    with pytest.raises(ValueError, match="gradients"):
        gae_rows(attentions, None, 1)
    with pytest.raises(ValueError, match="do not match"):
        gae_rows(attentions, gradients[:, :1], 1)


# --------------------------------------------------------------------------- #
# Raw attention
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("head_fusion", HEAD_FUSIONS)
@pytest.mark.parametrize(("prefix", "has_class_token"), [(1, True), (2, True), (0, False)])
def test_attention_is_the_last_layer_class_row(head_fusion, prefix, has_class_token):
    attentions, _ = random_attention(np.random.default_rng(8))
    expected = full_attention(attentions, head_fusion, prefix, has_class_token)
    np.testing.assert_allclose(attention_rows(attentions, head_fusion, prefix, has_class_token), expected, rtol=1e-6)


def test_attention_ignores_earlier_layers():
    attentions, _ = random_attention(np.random.default_rng(9))
    changed = attentions.copy()
    changed[:-1] = np.random.default_rng(10).permutation(changed[:-1].ravel()).reshape(changed[:-1].shape)
    np.testing.assert_array_equal(attention_masks(attentions, "mean", 1, (3, 3)), attention_masks(changed, "mean", 1, (3, 3)))


def test_attention_hand_made():
    last = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    attentions = np.stack([np.eye(3), last])[:, None, None]
    np.testing.assert_allclose(attention_masks(attentions, "mean", 1, (1, 2)), [[[1.0, 0.5]]])


# --------------------------------------------------------------------------- #
# start_layer
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("start_layer", [0, 1, 3])
def test_start_layer_skips_the_first_layers(start_layer):
    attentions, gradients = random_attention(np.random.default_rng(11))
    tail = slice(start_layer, None)
    np.testing.assert_allclose(
        rollout_rows(attentions, None, "max", 0.5, 1, start_layer=start_layer),
        rollout_rows(attentions[tail], None, "max", 0.5, 1),
    )
    np.testing.assert_allclose(
        rollout_rows(attentions, gradients, "mean", 0.3, 1, start_layer=start_layer),
        rollout_rows(attentions[tail], gradients[tail], "mean", 0.3, 1),
    )
    np.testing.assert_allclose(
        gae_rows(attentions, gradients, 1, start_layer=start_layer),
        full_gae(attentions, gradients, start_layer=start_layer),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        rollout_masks(attentions, None, "mean", 0.0, 1, (3, 3), start_layer=start_layer),
        rollout_masks(attentions[tail], None, "mean", 0.0, 1, (3, 3)),
    )


def test_start_layer_rollout_matches_torch_reference():
    torch = pytest.importorskip("torch")
    from vit_explain.reference import torch_rollout

    attentions, gradients = random_attention(np.random.default_rng(12), tokens=9)
    for grads, fusion in ((None, "max"), (gradients, "mean")):
        expected = torch_rollout(
            [torch.from_numpy(a) for a in attentions[2:]],
            None if grads is None else [torch.from_numpy(g) for g in grads[2:]],
            fusion, 0.6, 1,
        ).double().numpy()
        got = rollout_rows(attentions, grads, fusion, 0.6, 1, start_layer=2)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [-1, 4, 10, 1.5, True, None, "1"])
def test_start_layer_is_validated(bad):
    attentions, gradients = random_attention(np.random.default_rng(13))
    with pytest.raises(ValueError, match="start layer"):
        check_start_layer(bad, 4)
    with pytest.raises(ValueError, match="start layer"):
        rollout_rows(attentions, None, "max", 0.9, 1, start_layer=bad)
    with pytest.raises(ValueError, match="start layer"):
        gae_rows(attentions, gradients, 1, start_layer=bad)


def test_start_layer_error_names_the_range():
    with pytest.raises(ValueError, match=r"0\.\.3 \(the model has 4 layers\)"):
        check_start_layer(4, 4)


def test_rollout_default_unchanged_against_torch_reference():
    """The start_layer refactor leaves plain rollout and gradient rollout as they were."""
    torch = pytest.importorskip("torch")
    from vit_explain.reference import torch_rollout

    attentions, gradients = random_attention(np.random.default_rng(14), tokens=9)
    for grads, fusion in ((None, "max"), (None, "min"), (gradients, "mean")):
        expected = torch_rollout(
            [torch.from_numpy(a) for a in attentions],
            None if grads is None else [torch.from_numpy(g) for g in grads],
            fusion, 0.9, 1,
        ).double().numpy()
        np.testing.assert_allclose(rollout_rows(attentions, grads, fusion, 0.9, 1), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# Settings (no model needed)
# --------------------------------------------------------------------------- #


@pytest.fixture
def resolve():
    """resolve_settings as the (method, head_fusion, discard_ratio) the Explainer once returned."""

    def call(method, head_fusion, discard_ratio, has_category):
        settings = resolve_settings(method, head_fusion, discard_ratio, has_category=has_category)
        return settings.method, settings.head_fusion, settings.discard_ratio

    return call


def test_resolve_settings_per_method(resolve):
    assert resolve(None, None, None, False) == ("rollout", "max", 0.9)
    assert resolve(None, None, None, True) == ("grad_rollout", "mean", 0.9)
    assert resolve("gae", None, None, True) == ("gae", None, None)
    # A setting the method does not use is refused with the reason, as the CLI refuses the flag.
    with pytest.raises(ValueError, match="head_fusion and discard_ratio do not apply to gae: GAE averages"):
        resolve("gae", "max", 0.9, False)
    with pytest.raises(ValueError, match="head_fusion does not apply to gae"):
        resolve("gae", "min", None, True)
    with pytest.raises(ValueError, match="discard_ratio does not apply to attention: last-layer"):
        resolve("attention", None, 0.9, False)
    assert resolve("attention", "max", None, False) == ("attention", "max", None)
    assert DEFAULT_HEAD_FUSION["gae"] is None
    with pytest.raises(ValueError, match="gae, attention"):
        resolve("lrp", None, None, False)
    with pytest.raises(ValueError, match="head fusion"):
        resolve("attention", "median", None, False)


def test_every_record_names_its_maths_and_consistent_facts():
    for name, record in RECORDS.items():
        assert record.name == name and callable(record.relevance) and record.summary
        assert (record.default_head_fusion is None) == (not record.head_fusions)
        assert record.default_head_fusion is None or record.default_head_fusion in record.head_fusions
        # a method that refuses a setting says why
        if not (record.uses_head_fusion and record.uses_discard_ratio and record.uses_start_layer):
            assert record.why_unused
    assert [r.name for r in RECORDS.values() if r.class_specific] == ["grad_rollout", "gae"]


def test_settings_errors_name_the_settings_for_python_and_for_flags():
    flags = {"head_fusion": "--head-fusion", "discard_ratio": "--discard-ratio", "start_layer": "--start-layer"}.get
    with pytest.raises(SettingsError) as caught:
        resolve_settings("attention", None, 0.5, 1)
    assert str(caught.value).startswith("discard_ratio and start_layer do not apply to attention: last-layer")
    assert caught.value.message_for(flags).startswith("--discard-ratio and --start-layer do not apply to attention")
    assert caught.value.blame == "method"
    with pytest.raises(SettingsError, match=r"category_index applies to grad_rollout and gae, not rollout"):
        resolve_settings("rollout", has_category=True, refuse_category=True)
    assert resolve_settings("rollout", has_category=True).method == "rollout"  # the Python API lets it pass
    with pytest.raises(SettingsError, match=r"0\.\.1 \(the model has 2 layers\)") as caught:
        resolve_settings("gae", start_layer=2, num_layers=2)
    assert caught.value.blame == "start_layer"
    assert resolve_settings("gae", start_layer=2).start_layer == 2  # no model yet: the range waits


def test_settings_for_several_methods_go_where_they_apply():
    resolved = resolve_for_methods(METHODS, "min", 0.5, 1, num_layers=3)
    assert resolved["gae"] == resolve_settings("gae", start_layer=1)
    assert resolved["attention"] == resolve_settings("attention", "min")
    assert resolved["rollout"] == resolve_settings("rollout", "min", 0.5, 1)
    with pytest.raises(SettingsError, match="discard_ratio does not apply to gae or attention"):
        resolve_for_methods(["gae", "attention"], discard_ratio=0.5)


# --------------------------------------------------------------------------- #
# The exported model against the eager one
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    """deit_tiny, depth 2, random weights with q/k scaled x3 (peaky attention), exported once."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec
    from vit_explain.reference import TorchReference

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2)
    with torch.no_grad():
        for block in model.blocks:
            rows = slice(0, 2 * block.attn.qkv.in_features)
            block.attn.qkv.weight[rows] *= 3
            block.attn.qkv.bias[rows] *= 3
            block.attn.qkv.bias.add_(torch.randn(block.attn.qkv.bias.shape) * 0.05)
    model.eval()
    path = tmp_path_factory.mktemp("methods") / "deit_depth2.onnx"
    export_model(ModelSpec("deit_tiny_patch16_224", weights="random"), path, model=model)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return Explainer(path, device="cpu"), TorchReference(model), pixels


def _reference(deit, categories):
    from vit_explain.reference import one_hot

    explainer, reference, pixels = deit
    weights = one_hot(categories, pixels.shape[0], explainer.metadata.num_outputs)
    outputs = reference.outputs(pixels, weights)
    return outputs.attentions.double().numpy(), outputs.gradients.double().numpy(), outputs.logits.numpy()


@pytest.mark.slow
def test_attention_is_not_uniform(deit):
    explainer, reference, pixels = deit
    attentions = reference.outputs(pixels).attentions
    tokens = attentions.shape[-1]
    assert attentions.max(dim=-1).values.mean().item() > 3.0 / tokens


@pytest.mark.slow
@pytest.mark.parametrize("categories", [(3, 977), None])
def test_gae_parity_with_eager_model(deit, categories):
    explainer, _, pixels = deit
    result = explainer.explain(pixels.numpy(), method="gae", category_index=categories)
    explained = result.category_index
    if categories is None:  # top-1 of the ONNX logits; it must be the eager model's top-1 too
        assert explained is not None and len(explained) == 2
    else:
        assert explained == categories
    attentions, gradients, logits = _reference(deit, list(explained))
    if categories is None:
        assert tuple(int(i) for i in logits.argmax(axis=1)) == explained
    expected = unit_max(full_gae(attentions, gradients)).reshape(2, 14, 14)
    np.testing.assert_allclose(result.masks, expected, atol=5e-5)
    assert result.method == "gae" and result.head_fusion is None and result.discard_ratio is None
    assert result.settings() == {"method": "gae", "head_fusion": None, "discard_ratio": None, "start_layer": 0}


@pytest.mark.slow
def test_gae_start_layer_parity_with_eager_model(deit):
    explainer, _, pixels = deit
    result = explainer.explain(pixels.numpy(), method="gae", category_index=5, start_layer=1)
    attentions, gradients, _ = _reference(deit, [5, 5])
    expected = unit_max(full_gae(attentions, gradients, start_layer=1)).reshape(2, 14, 14)
    np.testing.assert_allclose(result.masks, expected, atol=5e-5)
    assert result.start_layer == 1
    # Leaving a layer out changes the map (the layers are not interchangeable here).
    assert not np.allclose(result.masks, explainer.explain(pixels.numpy(), method="gae", category_index=5).masks, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("head_fusion", [None, "max"])
def test_attention_parity_with_eager_model(deit, head_fusion):
    explainer, reference, pixels = deit
    result = explainer.explain(pixels.numpy(), method="attention", head_fusion=head_fusion)
    attentions = reference.outputs(pixels).attentions.double().numpy()
    expected = unit_max(full_attention(attentions, head_fusion or "mean")).reshape(2, 14, 14)
    np.testing.assert_allclose(result.masks, expected, atol=5e-5)
    assert result.head_fusion == (head_fusion or "mean") and result.discard_ratio is None


@pytest.mark.slow
def test_rollout_start_layer_parity_with_eager_model(deit):
    from vit_explain.reference import torch_rollout

    explainer, reference, pixels = deit
    result = explainer.explain(pixels.numpy(), method="rollout", head_fusion="max", discard_ratio=0.5, start_layer=1)
    attentions = reference.outputs(pixels).attentions
    expected = torch_rollout(list(attentions[1:]), None, "max", 0.5, 1).double().numpy()
    np.testing.assert_allclose(result.masks, unit_max(expected).reshape(2, 14, 14), atol=5e-5)
    assert result.settings()["start_layer"] == 1


@pytest.mark.slow
def test_explain_validates_start_layer(deit):
    explainer, _, pixels = deit
    with pytest.raises(ValueError, match=r"0\.\.1"):
        explainer.explain(pixels.numpy(), method="gae", start_layer=2)
    with pytest.raises(ValueError, match="start layer"):
        explainer.explain(pixels.numpy(), method="rollout", start_layer=-1)
    with pytest.raises(ValueError, match="start_layer does not apply to attention: last-layer attention reads the last layer alone"):
        explainer.explain(pixels.numpy(), method="attention", start_layer=1)


@pytest.mark.slow
def test_grad_rollout_still_matches_reference(deit):
    """The method dispatch refactor keeps gradient rollout as it was."""
    explainer, reference, pixels = deit
    result = explainer.explain(pixels.numpy(), method="grad_rollout", category_index=[1, 2], discard_ratio=0.8)
    expected = reference.masks(pixels, "grad_rollout", "mean", 0.8, [1, 2]).double().numpy()
    np.testing.assert_allclose(result.masks, expected, atol=5e-5)
