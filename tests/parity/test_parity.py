"""The exported engine against the PyTorch reference, family by family.

Three layers of agreement, so that a failure says where the fault is:

(a) the ONNX graph's logits, attentions and attention gradients equal eager timm's
    (:class:`TorchReference`), for two input seeds, batch sizes 1 and 3 and a different class
    per image;
(b) the numpy class-row rollout equals the reference's full ``N x N`` rollout when both are fed
    the *same* tensors, for every method, head fusion and discard ratio;
(c) end to end, ``Explainer.explain`` equals ``TorchReference.masks`` on the eager model.

Then the runtime's own promises: (d) images of a batch and successive calls are independent,
(e) the forward-only path (``compute_gradients=False``) skips the backward half and changes
nothing else, (f) masks have the model's grid shape, float32, max 1, no NaN.

The models are small random ones with sharpened attention (see ``tests/helpers/models.py``); the first test
checks that the sharpening worked, since uniform attention would let maths bugs through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from vit_explain.export.verify import relative_error  # noqa: E402
from vit_explain.metadata import (  # noqa: E402
    INPUT_CLASS_WEIGHTS,
    INPUT_COMPUTE_GRADIENTS,
    INPUT_PIXELS,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from vit_explain.methods.relevance import rollout_rows  # noqa: E402
from vit_explain.reference import ReferenceOutputs, TorchReference, one_hot, torch_rollout  # noqa: E402
from vit_explain.runtime import Explainer  # noqa: E402
from vit_explain.runtime.session import GraphOutputs, ModelSession  # noqa: E402

#: Relative error (max|onnx - eager| / max|eager|) allowed in (a). Measured on these models:
#: logits <= 1e-6, attentions <= 2e-6, gradients <= 1.4e-6 (float32, same ops in another order).
GRAPH_TOLERANCE = 1e-5
#: (b) feeds both rollouts identical float32 tensors; both compute in float64, so only the
#: summation order differs (~1e-15) plus the reference's final cast to float32 (~6e-8 relative).
SAME_INPUT_ROW_TOLERANCE = 1e-6

METHODS = ["rollout", "grad_rollout"]
HEAD_FUSIONS = ["mean", "min", "max"]
DISCARD_RATIOS = [0.0, 0.5, 0.9, 0.97]
INPUTS = [(0, 1), (0, 3), (1, 1), (1, 3)]  # (seed, batch size)


@dataclass
class Case:
    """One input batch for one family, with the graph's and the eager model's outputs for it."""

    pixels: np.ndarray  # [B, 3, H, W] float32
    categories: list[int]  # a different class (or feature) per image
    onnx: GraphOutputs
    eager: ReferenceOutputs
    session: ModelSession
    reference: TorchReference


def make_pixels(input_size: tuple[int, int, int], seed: int, batch: int) -> np.ndarray:
    """Standard-normal "preprocessed" images; for a given seed, image 0 is the same at any batch size."""
    generator = torch.Generator().manual_seed(100 + seed)
    return torch.randn(batch, *input_size, generator=generator).numpy()


def make_categories(num_outputs: int, seed: int, batch: int) -> list[int]:
    rng = np.random.default_rng(200 + seed)
    return [int(i) for i in rng.choice(num_outputs, size=batch, replace=False)]


def class_weights(categories: list[int], num_outputs: int) -> np.ndarray:
    """One-hot rows, the graph's ``class_weights`` input for explaining ``categories``."""
    return one_hot(categories, len(categories), num_outputs).numpy()


@pytest.fixture(scope="module")
def case(export_family):
    """``case(family_key, seed, batch)``: inputs and both engines' outputs, computed once per module."""
    cache: dict[tuple[str, int, int], Case] = {}
    sessions: dict[str, ModelSession] = {}

    def get(key: str, seed: int, batch: int) -> Case:
        if (key, seed, batch) not in cache:
            exported = export_family(key)
            meta = exported.metadata
            if key not in sessions:
                sessions[key] = ModelSession(exported.path, device="cpu")
            pixels = make_pixels(meta.preprocess.input_size, seed, batch)
            categories = make_categories(meta.num_outputs, seed, batch)
            weights = class_weights(categories, meta.num_outputs)
            reference = TorchReference(exported.model)
            cache[key, seed, batch] = Case(
                pixels,
                categories,
                sessions[key].run(pixels, weights),
                reference.outputs(torch.from_numpy(pixels), torch.from_numpy(weights)),
                sessions[key],
                reference,
            )
        return cache[key, seed, batch]

    return get


# --------------------------------------------------------------------------- #
# The test models are fit for purpose
# --------------------------------------------------------------------------- #


def test_attention_is_far_from_uniform(family_key, case):
    """Mean (over layers, images, heads, queries) of the largest probability per query is > 5/N,
    and nothing is saturated at 1 (which would make gradients vanish)."""
    attentions = case(family_key, 0, 3).onnx.attentions
    tokens = attentions.shape[-1]
    mean_max = float(attentions.max(axis=-1).mean())
    assert mean_max > 5 / tokens, f"attention too uniform: mean max {mean_max:.4f} vs uniform {1 / tokens:.4f}"
    assert attentions.max() < 0.999


# --------------------------------------------------------------------------- #
# (a) graph outputs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed, batch", INPUTS)
def test_graph_outputs_match_eager_pytorch(family_key, seed, batch, case, parity_record):
    """Logits, every layer's attention probabilities and d(logit of each image's class)/d(attention)."""
    c = case(family_key, seed, batch)
    errors = {
        "logits": relative_error(c.onnx.logits, c.eager.logits.numpy()),
        "attentions": relative_error(c.onnx.attentions, c.eager.attentions.numpy()),
        "gradients": relative_error(c.onnx.gradients, c.eager.gradients.numpy()),
    }
    for name, value in errors.items():
        parity_record(family_key, name, value)
    assert c.onnx.attentions.shape == tuple(c.eager.attentions.shape)
    assert c.onnx.gradients.shape == c.onnx.attentions.shape
    assert all(value <= GRAPH_TOLERANCE for value in errors.values()), errors
    assert np.abs(c.onnx.gradients).max() > 1e-3  # not a trivially zero backward pass


def test_each_image_gets_the_gradient_of_its_own_class(case):
    """Explaining one image's class must not be affected by which class the *other* images ask for:
    the score is sum(logits * weights), so row b of the weights only reaches image b."""
    c = case("deit", 1, 3)
    num_outputs = c.onnx.logits.shape[1]
    changed = list(c.categories)
    changed[1], changed[2] = (changed[1] + 1) % num_outputs, (changed[2] + 7) % num_outputs
    other = c.session.run(c.pixels, class_weights(changed, num_outputs))
    np.testing.assert_array_equal(other.gradients[:, 0], c.onnx.gradients[:, 0])
    assert relative_error(other.gradients[:, 1], c.onnx.gradients[:, 1]) > 1e-2


# --------------------------------------------------------------------------- #
# (b) rollout maths on identical tensors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("discard_ratio", DISCARD_RATIOS)
@pytest.mark.parametrize("head_fusion", HEAD_FUSIONS)
@pytest.mark.parametrize("method", METHODS)
def test_numpy_rollout_matches_torch_rollout_on_the_same_tensors(family_key, method, head_fusion, discard_ratio, case, compare_masks):
    """The engine's class-row rollout vs the reference's full-matrix rollout, on the graph's tensors.

    Both see identical numbers, so they discard the same entries, except that numpy's
    argpartition and torch's topk may break an exact tie at the boundary differently:
    ``compare_masks`` reports the comparison as tight unless such a tie exists.
    """
    c = case(family_key, 0, 3)
    meta = c.session.metadata
    attentions = c.onnx.attentions
    gradients = c.onnx.gradients if method == "grad_rollout" else None
    ours = rollout_rows(attentions, gradients, head_fusion, discard_ratio, meta.num_prefix_tokens, meta.has_class_token)
    theirs = torch_rollout(
        list(torch.from_numpy(attentions)),
        None if gradients is None else list(torch.from_numpy(gradients)),
        head_fusion, discard_ratio, meta.num_prefix_tokens, meta.has_class_token,
    ).double().numpy()
    assert ours.shape == theirs.shape == (3, meta.grid_size[0] * meta.grid_size[1])
    # Min fusion of A * G can leave nothing positive: an all-zero row is a valid answer (both
    # sides then compute exact zeros), so errors are relative to the peak only where it exists.
    peak = theirs.max(axis=1, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)
    bounds = compare_masks(
        attentions, gradients, attentions, gradients, head_fusion, discard_ratio,
        meta.num_prefix_tokens, meta.has_class_token,
    )
    error = np.abs(ours - theirs).max(axis=1) / peak[:, 0]
    # No tie at the boundary: both discarded the same entries, only rounding differs.
    assert (error[bounds.tight] <= SAME_INPUT_ROW_TOLERANCE).all(), error
    assert (error <= bounds.tolerance).all(), (error, bounds)


# --------------------------------------------------------------------------- #
# (c) end to end: Explainer on the ONNX file vs TorchReference on the eager model
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("discard_ratio", DISCARD_RATIOS)
@pytest.mark.parametrize("method", METHODS)
def test_explainer_masks_match_the_reference_masks(family_key, method, discard_ratio, case, compare_masks, parity_record):
    """Explainer.explain == TorchReference.masks for every head fusion, on two input batches.

    The graph's tensors differ from eager PyTorch's by ~1e-6 relative, so masks differ by float
    noise (tests.helpers.masks.MASK_TOLERANCE, plus ROW_NOISE / peak where almost nothing reaches the
    patches). With discard > 0 such noise could also move an entry across the discard boundary
    when the k-th and (k+1)-th smallest fused values are that close; ``compare_masks`` finds the
    entries the two sides discard differently and widens the bound by what they can change
    (derived in tests.helpers.masks.mask_comparison). Most images must be compared at the plain bound.
    """
    explainer = Explainer(case(family_key, 0, 1).session.path, device="cpu")
    tight = total = 0
    for seed, batch in [(0, 1), (1, 3)]:
        c = case(family_key, seed, batch)
        categories = c.categories if method == "grad_rollout" else None
        onnx_gradients = c.onnx.gradients if method == "grad_rollout" else None
        eager_gradients = c.eager.gradients.numpy() if method == "grad_rollout" else None
        meta = c.session.metadata
        for head_fusion in HEAD_FUSIONS:
            ours = explainer.explain(
                c.pixels, method=method, head_fusion=head_fusion, discard_ratio=discard_ratio, category_index=categories
            ).masks
            theirs = c.reference.masks(
                torch.from_numpy(c.pixels), method, head_fusion, discard_ratio, categories
            ).numpy()
            assert ours.shape == theirs.shape == (batch, *meta.grid_size)
            bounds = compare_masks(
                c.onnx.attentions, onnx_gradients, c.eager.attentions.numpy(), eager_gradients,
                head_fusion, discard_ratio, meta.num_prefix_tokens, meta.has_class_token,
            )
            error = np.abs(ours - theirs).reshape(batch, -1).max(axis=1)
            assert (error <= bounds.tolerance).all(), (head_fusion, seed, batch, error, bounds)
            regular = bounds.tight & (bounds.peak >= 1e-3)
            parity_record(family_key, "mask max diff", error[regular].max(initial=0.0))
            tight += int(bounds.tight.sum())
            total += batch
    assert tight >= total // 2, f"only {tight} of {total} masks compared at the float-noise bound"


# --------------------------------------------------------------------------- #
# (d) independence of images and of calls
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method, head_fusion", [("rollout", "max"), ("grad_rollout", "mean"), ("grad_rollout", "min")])
def test_batch_of_three_equals_each_image_alone(family_key, method, head_fusion, case, compare_masks):
    """The original tool discarded from image 0 only; here every image is explained as if alone.

    The graph run on a batch may round differently from three single runs, so masks are compared
    with the same discard-boundary bound as in (c) (the float-noise bound where the boundary is clear).
    """
    c = case(family_key, 1, 3)
    meta = c.session.metadata
    explainer = Explainer(c.session.path, device="cpu")
    categories = c.categories if method == "grad_rollout" else None
    together = explainer.explain(c.pixels, method=method, head_fusion=head_fusion, discard_ratio=0.9, category_index=categories)
    for item in range(3):
        single = c.pixels[item : item + 1]
        alone = explainer.explain(
            single, method=method, head_fusion=head_fusion, discard_ratio=0.9,
            category_index=None if categories is None else categories[item],
        )
        outputs = c.session.run(single, None if categories is None else class_weights([categories[item]], meta.num_outputs))
        bounds = compare_masks(
            c.onnx.attentions[:, item : item + 1],
            None if categories is None else c.onnx.gradients[:, item : item + 1],
            outputs.attentions, outputs.gradients, head_fusion, 0.9, meta.num_prefix_tokens, meta.has_class_token,
        )
        error = np.abs(together.masks[item] - alone.masks[0]).max()
        assert error <= bounds.tolerance[0], (item, error, bounds)
        assert relative_error(together.logits[item], alone.logits[0]) <= GRAPH_TOLERANCE


@pytest.mark.parametrize("key", ["deit", "vit-gap"])
def test_calls_are_independent(key, case):
    """No state survives a call: the same call twice is bit-identical, and a gradient call in
    between (which runs the backward half) does not change a rollout call, nor the reverse."""
    c = case(key, 1, 3)
    explainer = Explainer(c.session.path, device="cpu")
    first = explainer.explain(c.pixels, method="rollout", discard_ratio=0.9)
    gradient_first = explainer.explain(c.pixels, method="grad_rollout", category_index=c.categories)
    second = explainer.explain(c.pixels, method="rollout", discard_ratio=0.9)
    gradient_second = explainer.explain(c.pixels, method="grad_rollout", category_index=c.categories)
    np.testing.assert_array_equal(first.masks, second.masks)
    np.testing.assert_array_equal(first.logits, second.logits)
    np.testing.assert_array_equal(gradient_first.masks, gradient_second.masks)
    assert not np.array_equal(first.masks, gradient_first.masks)


# --------------------------------------------------------------------------- #
# (e) the forward-only path
# --------------------------------------------------------------------------- #


def test_forward_only_path_returns_no_gradients_and_the_same_forward(family_key, case):
    """compute_gradients=False takes the If's else branch: an empty gradient tensor, and logits and
    attentions identical to those of the full run (the forward nodes are shared)."""
    c = case(family_key, 0, 3)
    meta = c.session.metadata
    feeds = {
        INPUT_PIXELS: c.pixels,
        INPUT_CLASS_WEIGHTS: class_weights(c.categories, meta.num_outputs),
        INPUT_COMPUTE_GRADIENTS: np.array(False),
    }
    names = [OUTPUT_LOGITS, OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS]
    logits, attentions, gradients = c.session.full_session.run(names, feeds)
    assert gradients.size == 0 and gradients.ndim == 5
    np.testing.assert_array_equal(logits, c.onnx.logits)
    np.testing.assert_array_equal(attentions, c.onnx.attentions)
    plain = c.session.run(c.pixels)  # what rollout uses
    assert plain.gradients is None
    np.testing.assert_array_equal(plain.attentions, c.onnx.attentions)


# --------------------------------------------------------------------------- #
# (f) what a mask is
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
@pytest.mark.parametrize("method", METHODS)
def test_masks_have_the_grid_shape_float32_and_max_one(family_key, method, discard_ratio, case, export_family):
    """[B, grid_h, grid_w] from the model's own patch grid (6x8 for the 96x128 distilled DeiT),
    float32, in [0, 1], each image's max exactly 1 (or all zero), no NaN."""
    c = case(family_key, 0, 3)
    grid = tuple(export_family(family_key).model.patch_embed.grid_size)
    if family_key == "deit-distilled":
        assert grid == (6, 8)
    result = Explainer(c.session.path, device="cpu").explain(
        c.pixels, method=method, discard_ratio=discard_ratio,
        category_index=c.categories if method == "grad_rollout" else None,
    )
    masks = result.masks
    assert masks.shape == (3, *grid) and masks.dtype == np.float32
    assert not np.isnan(masks).any()
    assert masks.min() >= 0.0
    for mask in masks:
        assert mask.max() == 1.0 or not mask.any()
    assert masks.reshape(3, -1).max(axis=1).min() == 1.0  # these models give no all-zero mask


# --------------------------------------------------------------------------- #
# Known gap: models that pool the patch tokens but also have a class token
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("beit_base_patch16_224", dict(depth=2, embed_dim=192, num_heads=3)),
        ("eva02_tiny_patch14_224", dict(depth=2, img_size=112, num_classes=10)),
    ],
    ids=["beit", "eva02"],
)
@pytest.mark.parametrize("method", METHODS)
def test_rollout_of_an_average_pooled_model_starts_from_the_pooled_tokens(name, kwargs, method, make_test_model):
    """The head of an average-pooled model reads the mean of the patch tokens, so the rollout must
    start there (as for models without a class token), not from a class token the output never
    sees. Checked with the engine's maths and the token layout the exporter writes, on the eager
    tensors (which the graph reproduces, see (a)): what ``Explainer.explain`` would return."""
    from vit_explain.export.exporter import describe_model
    from vit_explain.families import ModelSpec

    model = make_test_model(name, seed=5, **kwargs)
    assert model.global_pool == "avg" and model.cls_token is not None
    meta = describe_model(model, ModelSpec(name, weights="random", seed=5))
    pixels = torch.from_numpy(make_pixels(meta.preprocess.input_size, 0, 2))
    outputs = TorchReference(model).outputs(pixels, torch.from_numpy(class_weights([1, 2], meta.num_outputs)))
    attentions = outputs.attentions.numpy()
    gradients = outputs.gradients.numpy() if method == "grad_rollout" else None
    engine = rollout_rows(attentions, gradients, "mean", 0.0, meta.num_prefix_tokens, meta.has_class_token)
    pooled = rollout_rows(attentions, gradients, "mean", 0.0, meta.num_prefix_tokens, has_class_token=False)
    np.testing.assert_allclose(engine, pooled, rtol=1e-6)
