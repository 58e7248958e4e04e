"""Where rollout starts for timm models, checked against the model itself: the output's gradient
with respect to the last block's token states is non-zero on exactly the tokens the seed weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from vit_explain.families.timm_vit import TimmViT  # noqa: E402
from vit_explain.methods.chain import seed_weights_for  # noqa: E402

CASES = {
    "deit": ("deit_tiny_patch16_224", dict(depth=1, img_size=32, patch_size=8, embed_dim=24, num_heads=2)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(depth=1, img_size=32, patch_size=8, embed_dim=24, num_heads=2)),
    "gap": ("vit_medium_patch16_gap_256", dict(depth=1, img_size=32, patch_size=8, embed_dim=24, num_heads=2)),
}


def _tokens_read(model: torch.nn.Module) -> np.ndarray:
    states = []
    handle = model.blocks[-1].register_forward_hook(lambda _m, _i, out: states.append(out))
    try:
        torch.manual_seed(0)
        pixels = torch.randn(1, 3, 32, 32)
        output = model(pixels)
        (gradient,) = torch.autograd.grad((output * torch.randn(output.shape)).sum(), states[0])
    finally:
        handle.remove()
    return (gradient[0].abs().sum(dim=-1) > 0).numpy()


@pytest.mark.parametrize("key", sorted(CASES))
def test_seed_covers_exactly_the_tokens_the_head_reads(key):
    name, kwargs = CASES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    reading = TimmViT().head_reading(model)
    prefix = int(model.num_prefix_tokens)
    weights = seed_weights_for(prefix, reading.has_class_token, reading.seed_weights)
    read = _tokens_read(model)
    seeded = np.concatenate([np.asarray(weights[:prefix]) > 0, np.full(read.size - prefix, weights[prefix] > 0)])
    np.testing.assert_array_equal(read, seeded)


def test_distilled_deit_seeds_from_the_average_of_class_and_distillation_rows():
    name, kwargs = CASES["deit-distilled"]
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    assert TimmViT().head_reading(model).seed_weights == (0.5, 0.5, 0.0)
