"""Faithfulness metrics on constructed models whose right answers are known, plus one real model.

The fake classifier's probability for class 0 is the fraction of a designated set of pixels
(four patches in the middle of a 4 x 4 grid) that still hold the clean image's values. A map
that puts those patches first is then provably the best one, its inverse the worst, and a
random map lies in between; curves can be written down by hand.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vit_explain.evaluate import (
    METRIC_NAMES,
    RANDOM,
    EvaluationResult,
    cosine_similarity,
    evaluate,
    evaluate_masks,
    trapezoid_auc,
    write_outputs,
)
from vit_explain.evaluate.perturbation import (
    baseline_images,
    gaussian_blur,
    patch_index_map,
    perturbation_counts,
    rank_descending,
    step_counts,
    upsample_bilinear,
)
from vit_explain.metadata import ModelMetadata, PreprocessConfig

GRID = 4
SIZE = 40  # 10 x 10 pixel patches; 1600 pixels, so 10% steps are whole pixels
EPS = 1e-12

DESIGNATED = np.zeros((GRID, GRID), dtype=bool)
DESIGNATED[1:3, 1:3] = True
DESIGNATED_PIXELS = np.kron(DESIGNATED, np.ones((SIZE // GRID, SIZE // GRID), dtype=bool))
PERFECT = DESIGNATED.astype(np.float64)
INVERTED = 1.0 - PERFECT


def clean_images(count=3, seed=0):
    """Noise images: no perturbed pixel (baseline or blur) can equal a clean one by chance."""
    return (np.random.default_rng(seed).normal(size=(count, 3, SIZE, SIZE)) + 2.0).astype(np.float32)


def visibility_model(clean, region=DESIGNATED_PIXELS):
    """``p(class 0)`` = share of ``region``'s pixels intact (for whichever clean image matches best)."""

    def score_fn(pixels):
        intact = []
        for image in pixels:
            same = np.all(image[:, region] == clean[:, :, region], axis=1)  # [clean images, region pixels]
            intact.append(same.mean(axis=1).max())
        p = np.asarray(intact)
        return np.stack([np.log(p + EPS), np.log(1.0 - p + EPS)], axis=1)

    return score_fn


def masks_for(count, *maps):
    return [np.repeat(m[None], count, axis=0) for m in maps]


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


def test_trapezoid_by_hand_on_three_points():
    # 0.25 * (1 + 0.2) / 2 + 0.75 * (0.2 + 0) / 2 = 0.15 + 0.075
    assert trapezoid_auc([0.0, 0.25, 1.0], [1.0, 0.2, 0.0]) == pytest.approx(0.225)
    np.testing.assert_allclose(trapezoid_auc([0.0, 0.5, 1.0], [[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]), [0.5, 1.0])
    assert trapezoid_auc([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        trapezoid_auc([0.0, 1.0], [1.0, 2.0, 3.0])


def test_cosine_similarity_handles_zero_vectors():
    np.testing.assert_allclose(cosine_similarity([[1.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [1.0, 1.0]]), [1.0, 0.0])


def test_schedules():
    np.testing.assert_array_equal(step_counts(16, 4), [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(step_counts(4, 16), [0, 1, 2, 3, 4])  # more steps than patches
    assert step_counts(196, 16)[[0, -1]].tolist() == [0, 196]
    np.testing.assert_array_equal(perturbation_counts(1600), np.arange(10) * 160)
    assert perturbation_counts(50176)[3] == 15052  # floor(0.3 * 224 * 224), as Chefer et al.
    with pytest.raises(ValueError, match="steps"):
        step_counts(16, 0)


def test_rank_descending_breaks_ties_with_the_key():
    ranks = rank_descending(np.array([[0.5, 0.9, 0.5, 0.1]]), np.array([[0.7, 0.0, 0.2, 0.5]]))
    np.testing.assert_array_equal(ranks, [[2, 0, 1, 3]])


def test_patch_index_map():
    index = patch_index_map((2, 3), 4, 6)
    np.testing.assert_array_equal(index, [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2)


def test_upsample_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    masks = np.random.default_rng(1).random((2, 3, 5))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(masks)[:, None], size=(24, 40), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(upsample_bilinear(masks, 24, 40), expected, atol=1e-12)


def test_baselines():
    pixels = clean_images(2)
    np.testing.assert_array_equal(baseline_images(pixels, "mean"), 0.0)
    black = baseline_images(pixels, "black", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    np.testing.assert_allclose(black[:, :, 0, 0], [[-1.0, -1.0, 0.0]] * 2)
    flat = np.full((1, 3, 16, 16), 0.7, dtype=np.float32)
    np.testing.assert_allclose(gaussian_blur(flat), flat, rtol=1e-6)
    blurred = baseline_images(pixels, "blur")
    assert blurred.shape == pixels.shape and blurred.std() < 0.5 * pixels.std()
    with pytest.raises(ValueError, match="black"):
        baseline_images(pixels, "black")
    with pytest.raises(ValueError, match="baseline"):
        baseline_images(pixels, "noise")


# --------------------------------------------------------------------------- #
# Deletion and insertion on the visibility model
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def visibility_result() -> EvaluationResult:
    pixels = clean_images(3)
    perfect, inverted = masks_for(3, PERFECT, INVERTED)
    return evaluate_masks(pixels, {"perfect": perfect, "inverted": inverted}, visibility_model(pixels), steps=16, batch_size=7, seed=0)


def test_deletion_curves_by_hand(visibility_result):
    result = visibility_result
    np.testing.assert_allclose(result.fractions["deletion"], np.arange(17) / 16)
    # Perfect: one designated patch (a quarter of the designated pixels) removed per step.
    expected = np.r_[1.0, 0.75, 0.5, 0.25, np.zeros(13)]
    np.testing.assert_allclose(result.curves["deletion"]["perfect"], np.tile(expected, (3, 1)), atol=1e-9)
    # Inverted: the designated patches go last.
    np.testing.assert_allclose(result.curves["deletion"]["inverted"], np.tile(1.0 - expected[::-1], (3, 1)), atol=1e-9)
    # Areas: 4 trapezoids of width 1/16 summing to 2 heights -> 2/16; the inverse 1 - 2/16.
    np.testing.assert_allclose(result.auc("deletion", "perfect"), 0.125, atol=1e-9)
    np.testing.assert_allclose(result.auc("deletion", "inverted"), 0.875, atol=1e-9)
    # Top-1 agreement: class 0 stays top-1 while at least half the region is intact (at exactly
    # half the two logits tie and argmax takes the first class).
    np.testing.assert_array_equal(result.top1["deletion"]["perfect"][0], np.r_[1, 1, 1, np.zeros(14)])
    np.testing.assert_allclose(result.top1_auc("deletion", "perfect"), 2.5 / 16)


def test_insertion_curves_by_hand(visibility_result):
    result = visibility_result
    expected = np.r_[0.0, 0.25, 0.5, 0.75, np.ones(13)]
    np.testing.assert_allclose(result.curves["insertion"]["perfect"], np.tile(expected, (3, 1)), atol=1e-9)
    np.testing.assert_allclose(result.auc("insertion", "perfect"), 0.875, atol=1e-9)
    np.testing.assert_allclose(result.auc("insertion", "inverted"), 0.125, atol=1e-9)


def test_random_map_lies_between_perfect_and_inverted(visibility_result):
    result = visibility_result
    assert result.methods == ("perfect", "inverted", RANDOM)
    for metric in METRIC_NAMES:
        best, worst = ("perfect", "inverted") if result.better(metric) == "higher" else ("inverted", "perfect")
        random = result.mean_auc(metric, RANDOM)
        assert result.mean_auc(metric, worst) < random < result.mean_auc(metric, best), metric
        # and per image, the perfect map is never beaten
        sign = 1 if result.better(metric) == "higher" else -1
        assert np.all(sign * result.auc(metric, "perfect") >= sign * result.auc(metric, RANDOM)), metric


def test_positive_and_negative_perturbation_ordering(visibility_result):
    result = visibility_result
    assert result.better("positive") == "lower" and result.better("negative") == "higher"
    pos = {m: result.mean_auc("positive", m) for m in result.methods}
    neg = {m: result.mean_auc("negative", m) for m in result.methods}
    assert pos["perfect"] < pos[RANDOM] < pos["inverted"]
    assert neg["perfect"] > neg[RANDOM] > neg["inverted"]
    assert pos["perfect"] < neg["perfect"]
    # Removing the top relevant pixels of the perfect map hurts at once (the bilinear upsampling
    # ranks the designated 25% of pixels first, bar a few at its blurred edge); removing the
    # bottom ones does not, until the pixels outside the region run out.
    curve_pos = result.curves["positive"]["perfect"][0]
    curve_neg = result.curves["negative"]["perfect"][0]
    assert curve_pos[0] == pytest.approx(1.0) and curve_pos[1] == pytest.approx(0.6) and curve_pos[3] < 0.05
    np.testing.assert_allclose(curve_neg[:7], 1.0, atol=1e-9)
    assert curve_neg[9] < 0.5


def test_perturbation_auc_includes_step_zero():
    """p = share of ALL pixels intact, so the positive curve is 1 - x whatever the map:
    the area over 0, 0.1, .., 0.9 is 0.9 - 0.9**2 / 2 = 0.495 (0.4 if step 0 were left out)."""
    pixels = clean_images(2)
    everything = np.ones((GRID * (SIZE // GRID),) * 2, dtype=bool)
    (perfect,) = masks_for(2, PERFECT)
    result = evaluate_masks(pixels, {"any": perfect}, visibility_model(pixels, everything), metrics=["positive", "negative"])
    np.testing.assert_allclose(result.fractions["positive"], np.arange(10) / 10)
    np.testing.assert_allclose(result.curves["positive"]["any"], np.tile(1 - np.arange(10) / 10, (2, 1)), atol=1e-9)
    np.testing.assert_allclose(result.auc("positive", "any"), 0.495, atol=1e-9)
    np.testing.assert_allclose(result.auc("negative", RANDOM), 0.495, atol=1e-9)
    assert result.metrics == ("positive", "negative")


def test_steps_parameter():
    pixels = clean_images(1)
    (perfect,) = masks_for(1, PERFECT)
    result = evaluate_masks(pixels, {"perfect": perfect}, visibility_model(pixels), steps=4, metrics=["deletion"], include_random=False)
    np.testing.assert_allclose(result.fractions["deletion"], [0, 0.25, 0.5, 0.75, 1.0])
    # The first step removes the 4 top patches = the whole designated region.
    np.testing.assert_allclose(result.curves["deletion"]["perfect"][0], [1, 0, 0, 0, 0], atol=1e-9)
    assert result.methods == ("perfect",)


def test_results_do_not_depend_on_batch_size_and_random_is_seeded():
    pixels = clean_images(2, seed=4)
    maps = dict(zip(("perfect", "noise"), masks_for(2, PERFECT, np.random.default_rng(5).random((GRID, GRID))), strict=True))
    model = visibility_model(pixels)
    runs = [evaluate_masks(pixels, maps, model, steps=8, batch_size=b, seed=3) for b in (1, 6, 500)]
    for other in runs[1:]:
        for metric in METRIC_NAMES:
            for method in runs[0].methods:
                np.testing.assert_array_equal(runs[0].curves[metric][method], other.curves[metric][method])
    reseeded = evaluate_masks(pixels, maps, model, steps=8, seed=4)
    assert not np.array_equal(reseeded.curves["deletion"][RANDOM], runs[0].curves["deletion"][RANDOM])
    np.testing.assert_array_equal(reseeded.curves["deletion"]["perfect"], runs[0].curves["deletion"]["perfect"])


def test_flat_map_ties_are_broken_randomly_not_top_left_first():
    """A constant map must not systematically delete the first patches in raster order."""
    pixels = clean_images(8)
    region = np.zeros((GRID, GRID), dtype=bool)
    region[0, :2] = True  # the two top-left patches: raster order would hit them first
    model = visibility_model(pixels, np.kron(region, np.ones((10, 10), dtype=bool)))
    (flat,) = masks_for(8, np.zeros((GRID, GRID)))
    result = evaluate_masks(pixels, {"flat": flat}, model, steps=16, metrics=["deletion"], include_random=False)
    assert result.mean_auc("deletion", "flat") > 0.2  # raster order would give 1/16


def test_progress_reports_every_forward_pass():
    pixels = clean_images(2)
    (perfect,) = masks_for(2, PERFECT)
    seen = []
    evaluate_masks(pixels, {"p": perfect}, visibility_model(pixels), steps=4, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    done, total = seen[-1]
    assert done == total
    # 2 clean + 2 x 2 baselines (mean, blur) + per image and map: 3 + 3 + 9 + 9 perturbed images
    assert total == 2 + 4 + 2 * 2 * 24
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_invalid_arguments():
    pixels = clean_images(1)
    (perfect,) = masks_for(1, PERFECT)
    model = visibility_model(pixels)
    with pytest.raises(ValueError, match="steps"):
        evaluate_masks(pixels, {"p": perfect}, model, steps=0)
    with pytest.raises(ValueError, match="batch size"):
        evaluate_masks(pixels, {"p": perfect}, model, batch_size=0)
    with pytest.raises(ValueError, match="metric"):
        evaluate_masks(pixels, {"p": perfect}, model, metrics=["auc"])
    with pytest.raises(ValueError, match="insertion baseline"):
        evaluate_masks(pixels, {"p": perfect}, model, insertion_baseline="noise")
    with pytest.raises(ValueError, match="seed"):
        evaluate_masks(pixels, {"p": perfect}, model, seed=-1)
    with pytest.raises(ValueError, match="score_fn"):
        evaluate_masks(pixels, {"p": perfect}, lambda x: np.zeros(len(x)))
    with pytest.raises(ValueError, match="masks must be"):
        evaluate_masks(pixels, {"p": perfect[0]}, model)


# --------------------------------------------------------------------------- #
# Feature models: cosine similarity to the clean features
# --------------------------------------------------------------------------- #


def patch_mean_features(pixels):
    """A 'feature model': the mean of each patch (one feature per patch)."""
    b = pixels.shape[0]
    patches = pixels.reshape(b, 3, GRID, SIZE // GRID, GRID, SIZE // GRID)
    return patches.mean(axis=(1, 3, 5)).reshape(b, GRID * GRID)


def test_feature_model_scores_cosine_similarity():
    """Clean images are constant (2 and 5), the baseline is 0: after deleting k of 16 patches the
    features are the clean ones with k zeros, so the cosine is sqrt((16 - k) / 16)."""
    pixels = np.stack([np.full((3, SIZE, SIZE), 2.0), np.full((3, SIZE, SIZE), 5.0)]).astype(np.float32)
    maps = dict(zip(("perfect", "inverted"), masks_for(2, PERFECT, INVERTED), strict=True))
    result = evaluate_masks(
        pixels, maps, patch_mean_features, output_kind="features", steps=16,
        metrics=["deletion", "insertion"], insertion_baseline="mean",
    )
    assert result.score_kind == "cosine" and result.top1 is None
    assert result.targets == (None, None)
    x = result.fractions["deletion"]
    for method in result.methods:
        np.testing.assert_allclose(result.curves["deletion"][method], np.tile(np.sqrt(1 - x), (2, 1)), atol=1e-7)
        np.testing.assert_allclose(result.curves["insertion"][method], np.tile(np.sqrt(x), (2, 1)), atol=1e-7)
    np.testing.assert_allclose(result.clean_scores, 1.0)
    assert "deletion_top1_auc" not in result.columns()


# --------------------------------------------------------------------------- #
# evaluate() with an injected explainer and model
# --------------------------------------------------------------------------- #


def fake_metadata(output_kind="logits", num_outputs=2):
    return ModelMetadata(
        source_model="fake", weights="constructed", weights_sha256="0" * 64,
        preprocess=PreprocessConfig((3, SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        patch_size=(SIZE // GRID, SIZE // GRID), grid_size=(GRID, GRID), num_prefix_tokens=1,
        has_class_token=True, num_layers=2, num_heads=1, num_outputs=num_outputs, output_kind=output_kind,
        opset=20, package_version="test", class_names=("designated", "other")[:num_outputs],
    )


class FakeExplainer:
    """gae knows the answer, rollout has it backwards, attention is flat."""

    MAPS = {"gae": PERFECT, "rollout": INVERTED, "attention": np.zeros((GRID, GRID)), "grad_rollout": PERFECT}

    def __init__(self, output_kind="logits"):
        self.metadata = fake_metadata(output_kind)
        self.calls = []

    def explain(self, pixels, method=None, category_index=None, **settings):
        self.calls.append((method, pixels.shape[0], category_index, settings))
        masks = np.repeat(self.MAPS[method][None], pixels.shape[0], axis=0).astype(np.float32)

        class Result:
            def settings(self_inner):
                return {"method": method, **settings}

        result = Result()
        result.masks = masks
        return result

    def preprocess(self, inputs):
        return np.stack([np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 + 0.5 for image in inputs])


def test_evaluate_with_injected_explainer_and_model():
    pixels = clean_images(5)
    explainer = FakeExplainer()
    result = evaluate(
        explainer, pixels, methods=["gae", "rollout", "attention"], steps=16, batch_size=2, seed=1,
        method_settings={"rollout": {"head_fusion": "max"}}, score_fn=visibility_model(pixels),
    )
    assert result.methods == ("gae", "rollout", "attention", RANDOM)
    assert result.targets == (0,) * 5  # top-1 of the clean image
    assert result.target_names == ("designated",) * 5
    assert result.images == tuple(f"image {i}" for i in range(5))
    np.testing.assert_allclose(result.auc("deletion", "gae"), 0.125, atol=1e-9)
    np.testing.assert_allclose(result.auc("deletion", "rollout"), 0.875, atol=1e-9)
    # explained in batches of 2, the scored class passed to every call, settings passed through
    assert [c[1] for c in explainer.calls if c[0] == "gae"] == [2, 2, 1]
    assert all(c[2] == [0] * c[1] for c in explainer.calls)
    assert [c[3] for c in explainer.calls if c[0] == "rollout"] == [{"head_fusion": "max"}] * 3
    assert result.settings["method_settings"]["rollout"] == {"method": "rollout", "head_fusion": "max"}
    assert result.settings["steps"] == 16 and result.settings["seed"] == 1
    assert result.settings["deletion_baseline"] == "mean" and result.settings["insertion_baseline"] == "blur"


def test_evaluate_category_index_and_validation():
    pixels = clean_images(2)
    explainer = FakeExplainer()
    result = evaluate(
        explainer, pixels, methods=["gae"], category_index=1, steps=4, score_fn=visibility_model(pixels), include_random=False
    )
    assert result.targets == (1, 1) and result.methods == ("gae",)
    # p(class 1) = 1 - share intact: deleting the designated patches first makes it rise fast
    assert result.mean_auc("deletion", "gae") > 0.5
    with pytest.raises(ValueError, match="method"):
        evaluate(explainer, pixels, methods=["lime"], score_fn=visibility_model(pixels))
    with pytest.raises(ValueError, match="out of range"):
        evaluate(explainer, pixels, methods=["gae"], category_index=2, score_fn=visibility_model(pixels))
    with pytest.raises(ValueError, match="2 images"):
        evaluate(explainer, pixels, methods=["gae"], category_index=[0, 1, 0], score_fn=visibility_model(pixels))
    with pytest.raises(ValueError, match="not among"):
        evaluate(explainer, pixels, methods=["gae"], method_settings={"rollout": {}}, score_fn=visibility_model(pixels))
    with pytest.raises(ValueError, match=r"\[B, 3, 40, 40\]"):
        evaluate(explainer, pixels[:, :, :20], methods=["gae"], score_fn=visibility_model(pixels))
    # "random" may be named explicitly
    named = evaluate(explainer, pixels, methods=["gae", "random"], steps=4, score_fn=visibility_model(pixels), include_random=False)
    assert named.methods == ("gae", RANDOM)


def test_evaluate_feature_model_with_injected_explainer():
    pixels = np.stack([np.full((3, SIZE, SIZE), 1.5), np.full((3, SIZE, SIZE), 3.0)]).astype(np.float32)
    explainer = FakeExplainer("features")
    explainer.metadata = fake_metadata("features", num_outputs=GRID * GRID)
    result = evaluate(explainer, pixels, methods=["gae"], steps=16, metrics=["deletion"], score_fn=patch_mean_features)
    assert result.score_kind == "cosine" and result.targets == (None, None)
    assert all(call[2] is None for call in explainer.calls)  # grad methods explain the feature direction
    x = result.fractions["deletion"]
    np.testing.assert_allclose(result.curves["deletion"]["gae"], np.tile(np.sqrt(1 - x), (2, 1)), atol=1e-7)


def test_evaluate_loads_pil_images_and_names_them(tmp_path):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(2)]
    explainer = FakeExplainer()
    pixels = explainer.preprocess(images)
    result = evaluate(explainer, images, methods=["gae"], steps=4, score_fn=visibility_model(pixels))
    assert result.images == ("image 0", "image 1")
    np.testing.assert_allclose(result.auc("deletion", "gae"), [0.125, 0.125], atol=1e-9)


# --------------------------------------------------------------------------- #
# Writers
# --------------------------------------------------------------------------- #


def test_writers(visibility_result, tmp_path):
    paths = write_outputs(visibility_result, tmp_path / "out")
    assert sorted(paths) == ["csv", "json", "png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evaluation.csv", "evaluation.json", "evaluation.png"]

    with paths["csv"].open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 + 3  # images x methods, then one mean row per method
    assert list(rows[0]) == visibility_result.columns()
    assert rows[0]["image"] == "image 0" and rows[0]["method"] == "perfect" and rows[0]["target"] == "0"
    assert float(rows[0]["deletion_auc"]) == pytest.approx(0.125, abs=1e-6)
    means = [r for r in rows if r["image"] == "mean"]
    assert [r["method"] for r in means] == ["perfect", "inverted", RANDOM] and means[0]["target"] == ""
    assert float(means[1]["insertion_auc"]) == pytest.approx(0.125, abs=1e-6)

    document = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert document["score"] == "probability"
    assert document["metrics"]["deletion"]["better"] == "lower"
    assert len(document["metrics"]["positive"]["fractions"]) == 10
    assert document["images"][0]["methods"]["perfect"]["deletion"]["auc"] == pytest.approx(0.125, abs=1e-9)
    assert len(document["mean_curves"]["insertion"]["inverted"]) == 17
    assert document["averages"][0]["method"] == "perfect"

    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.width > 4 * image.height / 2
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_packages_do_not_import_torch():
    code = "import sys, vit_explain.runtime, vit_explain.evaluate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- #
# End to end on a small exported model
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from vit_explain.export.exporter import export_model
    from vit_explain.families import ModelSpec
    from vit_explain.runtime import Explainer

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=10)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features] *= 3
    path = tmp_path_factory.mktemp("evaluate") / "deit_small.onnx"
    export_model(ModelSpec("deit_tiny_patch16_224", weights="random"), path, model=model.eval())
    return Explainer(path, device="cpu")


@pytest.mark.slow
def test_end_to_end_smoke(small_model, tmp_path):
    explainer = small_model
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
        files.append(path)
    seen = []
    result = evaluate(explainer, files, steps=4, batch_size=8, seed=0, progress=lambda d, t: seen.append((d, t)))
    assert result.methods == ("rollout", "grad_rollout", "gae", "attention", RANDOM)
    assert result.images == tuple(str(p) for p in files)
    pixels = explainer.preprocess(files)
    logits = explainer.session.run(pixels).logits
    assert result.targets == tuple(int(t) for t in logits.argmax(axis=1))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.clean_scores, probabilities.max(axis=1), rtol=1e-5)
    for metric in METRIC_NAMES:
        for method in result.methods:
            curve = result.curves[metric][method]
            assert np.all(np.isfinite(curve)) and np.all((curve >= 0) & (curve <= 1))
            # Every curve but insertion starts at the clean image; insertion ends there.
            clean_end = curve[:, -1] if metric == "insertion" else curve[:, 0]
            np.testing.assert_allclose(clean_end, result.clean_scores, rtol=1e-6)
            # The fully perturbed end is the same image whatever the map.
            if metric in ("deletion", "insertion"):
                other_end = curve[:, 0] if metric == "insertion" else curve[:, -1]
                np.testing.assert_allclose(other_end, result.curves[metric][RANDOM][:, 0 if metric == "insertion" else -1])
        assert result.curves[metric]["gae"].shape == (2, 5 if metric in ("deletion", "insertion") else 10)
    assert seen[-1][0] == seen[-1][1]
    assert result.settings["model"] == "deit_tiny_patch16_224"
    assert result.settings["method_settings"]["gae"]["head_fusion"] is None
    paths = write_outputs(result, tmp_path / "eval")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())

    # An array of preprocessed images gives the same numbers.
    again = evaluate(explainer, pixels, methods=["gae"], steps=4, batch_size=3, seed=0)
    np.testing.assert_allclose(again.curves["deletion"]["gae"], result.curves["deletion"]["gae"], rtol=1e-5)
    np.testing.assert_allclose(again.curves["positive"][RANDOM], result.curves["positive"][RANDOM], rtol=1e-5)


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #


def _cli(*args):
    from click.testing import CliRunner

    from vit_explain.cli import main

    return CliRunner().invoke(main, ["evaluate", *[str(a) for a in args]])


def _photos(folder, count=2):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_names_rows_by_file_and_passes_explain_settings(small_model, tmp_path):
    photos = _photos(tmp_path / "in")
    out = tmp_path / "out"
    result = _cli(*photos, "--model", small_model.session.path, "--steps", "2", "--discard-ratio", "0.5",
                  "--start-layer", "1", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    with (out / "evaluation.csv").open(newline="", encoding="utf-8") as f:
        images = {row["image"] for row in csv.DictReader(f)}
    assert images == {str(p) for p in photos} | {"mean"}
    recorded = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))["settings"]["method_settings"]
    # each flag reached the methods that use it, and only those; the rest kept explain's defaults
    assert recorded["rollout"]["discard_ratio"] == 0.5 and recorded["rollout"]["head_fusion"] == "max"
    assert recorded["grad_rollout"]["discard_ratio"] == 0.5 and recorded["grad_rollout"]["head_fusion"] == "mean"
    assert recorded["gae"]["head_fusion"] is None and recorded["gae"]["start_layer"] == 1
    assert recorded["attention"]["discard_ratio"] is None and recorded["attention"]["start_layer"] == 0
    assert recorded["rollout"]["start_layer"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "gae", "--head-fusion", "min"], "--head-fusion does not apply to gae"),
        (["--method", "gae", "--method", "attention", "--discard-ratio", "0.5"], "--discard-ratio does not apply to gae or attention"),
        (["--method", "attention", "--start-layer", "1"], "--start-layer does not apply to attention"),
        (["--start-layer", "2"], "the model has 2 layers"),
        (["--discard-ratio", "1"], "--discard-ratio"),
    ],
)
def test_cli_refuses_settings_as_explain_does(small_model, tmp_path, flags, message):
    photos = _photos(tmp_path / "in", 1)
    result = _cli(*photos, "--model", small_model.session.path, *flags, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_checks_the_output_folder_before_the_work(small_model, tmp_path, monkeypatch):
    import vit_explain.evaluate as package

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the results could never be written")

    monkeypatch.setattr(package, "evaluate", must_not_run)
    photos = _photos(tmp_path / "in", 1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _cli(*photos, "--model", small_model.session.path, "-o", blocker / "out")
    assert result.exit_code == 1
    assert "cannot write in the output folder" in _one_error_line(result)
    (tmp_path / "out" / "evaluation.json").mkdir(parents=True)  # a folder in the way of one output
    result = _cli(*photos, "--model", small_model.session.path, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "evaluation.json: a folder is in the way" in _one_error_line(result)


@pytest.mark.slow
def test_cli_prints_the_table_before_a_failed_write(small_model, tmp_path, monkeypatch):
    import errno

    import vit_explain.evaluate.writers as writers

    def disk_full(result, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers, "save_plot", disk_full)
    photos = _photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    result = _cli(*photos, "--model", small_model.session.path, "--method", "gae", "--steps", "2", "-o", out, "-q")
    assert result.exit_code == 1
    assert f"cannot write {out / 'evaluation.png'}: No space left on device" in _one_error_line(result)
    assert "gae" in result.stdout and "random" in result.stdout and "deletion (lower better)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "evaluation.json"]  # atomic: no temp left


def test_result_and_writers_import_without_a_circle():
    """writers imports result; result (pure data) must import nothing of writers, even lazily."""
    import ast

    import vit_explain.evaluate.result as result_module

    tree = ast.parse(open(result_module.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.endswith("writers") for name in imported), imported
    subprocess.run([sys.executable, "-c", "import vit_explain.evaluate.writers"], check=True)
