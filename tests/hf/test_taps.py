"""The taps of the transformers and torchvision adapters: the tapped probabilities are the ones
the output is made from.

* the tapped attention computes what the library's own attention computes (transformers' eager
  and SDPA implementations; torchvision's ``nn.MultiheadAttention``), and the maps equal the
  ones transformers itself returns with ``output_attentions``;
* the gradient the taps record is d(score)/d(probabilities): checked against central finite
  differences in float64, by perturbing single entries of the tapped maps through ``edit``;
* the torchvision family exports with graph-vs-eager parity and the masks of every method.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from tests.helpers.hf_models import HF_FAMILIES  # noqa: E402
from vit_explain.families import FAMILIES, ModelSpec  # noqa: E402
from vit_explain.families.hf_vit import HFTaps, wrap_hf_model  # noqa: E402
from vit_explain.families.torchvision_vit import TorchvisionTaps  # noqa: E402


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("key", ["hf-vit", "hf-beit", "hf-dinov2-reg-classifier"])
def test_tapped_attention_is_transformers_own(key):
    family = HF_FAMILIES[key]
    raw = family.build()
    height, width = family.img_size or (raw.config.image_size,) * 2
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw.set_attn_implementation("eager")
        eager = raw(pixel_values=pixels, output_attentions=True)
        raw.set_attn_implementation("sdpa")
        sdpa = raw(pixel_values=pixels).logits
        model = wrap_hf_model(raw)
        with HFTaps() as taps:
            ours = model(pixels)
    assert _relative(ours, eager.logits) < 1e-6
    assert _relative(ours, sdpa) < 1e-5
    assert len(taps.attentions) == len(eager.attentions) == raw.config.num_hidden_layers
    for tapped, theirs in zip(taps.attentions, eager.attentions, strict=True):
        assert _relative(tapped, theirs) < 1e-6


def _finite_difference_check(model, taps_for, pixels, weights, entries, eps=1e-6):
    """autograd's d(sum(out * weights))/dA at ``entries`` (layer, b, h, i, j) against central
    differences, every map perturbed through the taps' ``edit``."""
    with taps_for(model, True) as taps, torch.enable_grad():
        taps.reset()
        score = (model(pixels.clone().requires_grad_(True)) * weights).sum()
        score.backward()
        autograd = [float(taps.gradients[layer][b, h, i, j]) for layer, b, h, i, j in entries]
    numeric = []
    for layer, b, h, i, j in entries:
        values = []
        for sign in (1.0, -1.0):
            def edit(at, maps, sign=sign, layer=layer, b=b, h=h, i=i, j=j):
                if at != layer:
                    return maps
                delta = torch.zeros_like(maps)
                delta[b, h, i, j] = sign * eps
                return maps + delta

            with taps_for(model, False) as taps, torch.no_grad():
                taps.reset()
                taps.edit = edit
                values.append(float((model(pixels) * weights).sum()))
        numeric.append((values[0] - values[1]) / (2 * eps))
    autograd, numeric = np.array(autograd), np.array(numeric)
    assert np.abs(autograd).max() > 1e-3  # the entries matter to the score
    np.testing.assert_allclose(autograd, numeric, rtol=1e-5, atol=1e-7 * np.abs(autograd).max())


ENTRIES = [(0, 0, 0, 0, 1), (0, 1, 1, 3, 0), (1, 0, 2, 0, 0), (1, 1, 0, 0, 5), (1, 0, 1, 4, 2)]


def test_transformers_attention_gradient_matches_finite_differences():
    family = HF_FAMILIES["hf-dinov2-reg-classifier"]
    model = wrap_hf_model(family.build()).double()
    pixels = torch.randn(2, 3, 35, 35, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _finite_difference_check(model, lambda _m, grads: HFTaps(grads), pixels, weights, ENTRIES)


def tiny_torchvision_vit(seed: int = 0, image_size: int = 32):
    """A small torchvision ViT with a non-zero head (torchvision initialises it to zeros),
    biases and class token, and sharpened attention."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48,
                              mlp_dim=96, num_classes=5)
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "class_token":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif name.startswith("heads") and name.endswith("weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3 / parameter.shape[1] ** 0.5)
            elif name.endswith("bias"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif name.endswith("in_proj_weight"):
                parameter[: 2 * 48] *= 3.0  # query and key rows
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.arch_name = "vit_b_16"
    return model.eval()


def test_torchvision_taps_compute_what_multihead_attention_computes():
    model = tiny_torchvision_vit()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(pixels)
        with TorchvisionTaps(model) as taps:
            tapped = model(pixels)
    assert _relative(tapped, native) < 1e-6
    assert [tuple(a.shape) for a in taps.attentions] == [(3, 3, 17, 17)] * 2
    assert all("forward" not in vars(block.self_attention) for block in model.encoder.layers)  # removed on exit
    # need_weights=True would give the head average, computed beside the output: not the per-head maps.
    block = model.encoder.layers[0]
    with torch.no_grad():
        x = block.ln_1(model.encoder.pos_embedding + torch.cat(
            [model.class_token.expand(3, -1, -1), model._process_input(pixels)], dim=1))
        _, averaged = block.self_attention(x, x, x, need_weights=True)
    assert averaged.shape == (3, 17, 17)
    torch.testing.assert_close(averaged, taps.attentions[0].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_torchvision_attention_gradient_matches_finite_differences():
    model = tiny_torchvision_vit(seed=1).double()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _finite_difference_check(model, lambda m, grads: TorchvisionTaps(m, grads), pixels, weights, ENTRIES)


def test_torchvision_export_matches_eager(tmp_path):
    """Graph vs eager and every method's mask for a small torchvision ViT (batch 3, three classes)."""
    from vit_explain.export.exporter import export_model
    from vit_explain.export.verify import relative_error
    from vit_explain.reference import TorchReference, one_hot, torch_gae, torch_rollout
    from vit_explain.runtime import Explainer
    from vit_explain.runtime.session import ModelSession

    model = tiny_torchvision_vit(seed=2)
    spec = ModelSpec("torchvision:vit_b_16", weights="random", family="torchvision")
    result = export_model(spec, tmp_path / "tv.onnx", model=model)
    meta = result.metadata
    assert (meta.num_prefix_tokens, meta.grid_size, meta.seed_weights, meta.has_class_token) == (1, (4, 4), None, True)
    assert meta.preprocess.resize_size == (37,) and meta.preprocess.interpolation == "bilinear"  # 256/224 of 32
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    categories = [0, 3, 4]
    weights = one_hot(categories, 3, 5)
    graph = ModelSession(result.path, device="cpu").run(pixels.numpy(), weights.numpy())
    eager = TorchReference(model, FAMILIES["torchvision"]).outputs(pixels, weights)
    for name in ("logits", "attentions", "gradients"):
        assert relative_error(getattr(graph, name), getattr(eager, name).numpy()) < 1e-5, name
    explainer = Explainer(result.path, device="cpu")
    attentions, gradients = list(eager.attentions), list(eager.gradients)
    for method, expected in (
        ("rollout", torch_rollout(attentions, None, "max", 0.0, 1)),
        ("grad_rollout", torch_rollout(attentions, gradients, "mean", 0.0, 1)),
        ("gae", torch_gae(attentions, gradients, 1)),
    ):
        kwargs = {} if method == "gae" else {"discard_ratio": 0.0}
        masks = explainer.explain(pixels.numpy(), method=method, category_index=categories, **kwargs).masks
        expected = expected.double().numpy()
        expected = expected / expected.max(axis=1, keepdims=True)
        np.testing.assert_allclose(masks.reshape(3, -1), expected, atol=1e-5)
