"""The real DINOv2 ViT-S/14 in ``../shared/models``, as a transformers ``Dinov2Model``, gives the
masks of the timm export of the same weights.

The timm model is built at 112 px with the checkpoint loaded the timm way (position embedding
resampled from 37x37 to 8x8); its state dict is converted, key by key, into a transformers
``Dinov2Model`` configured for 112 px (so neither side interpolates at run time), saved with
``save_pretrained`` and exported from that folder. Both files then explain the same preprocessed
photos with every method; the masks must agree to 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from tests.helpers.paths import SHARED  # noqa: E402

SHARED_MODEL = SHARED / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"
SHARED_IMAGES = SHARED / "images"


def timm_to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ``vit_*_dinov2`` parameter names -> transformers ``Dinov2Model`` ones (qkv split)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1]),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        timm, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            part = ("q_proj", "k_proj", "v_proj").index(name)
            width = state[timm + "attn.qkv.weight"].shape[1]
            out[hf + f"attention.{name}.weight"] = state[timm + "attn.qkv.weight"][part * width : (part + 1) * width]
            out[hf + f"attention.{name}.bias"] = state[timm + "attn.qkv.bias"][part * width : (part + 1) * width]
        pairs = {
            "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }
        for source, target in pairs.items():
            out[hf + target + ".weight"] = state[timm + source + ".weight"]
            out[hf + target + ".bias"] = state[timm + source + ".bias"]
        out[hf + "layer_scale1.lambda1"] = state[timm + "ls1.gamma"]
        out[hf + "layer_scale2.lambda1"] = state[timm + "ls2.gamma"]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MODEL.is_file(), reason="../shared/models is not present (a user's clone)")
def test_real_dinov2_as_transformers_model_gives_the_timm_masks(tmp_path, parity_record):
    from vit_explain.export.exporter import export_model
    from vit_explain.families import FAMILIES, ModelSpec
    from vit_explain.runtime import Explainer

    timm_spec = ModelSpec("vit_small_patch14_dinov2", weights=str(SHARED_MODEL), img_size=(112, 112), num_classes=0)
    timm_model = FAMILIES["timm"].build(timm_spec)
    timm_file = export_model(timm_spec, tmp_path / "timm.onnx", model=timm_model).path

    config = transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14, image_size=112,
        layerscale_value=1e-5, layer_norm_eps=1e-6,
    )
    hf_model = transformers.Dinov2Model(config)
    hf_model.load_state_dict(timm_to_transformers(timm_model.state_dict(), 12), strict=True)
    hf_model.save_pretrained(tmp_path / "dinov2-small")
    hf_spec = ModelSpec(str(tmp_path / "dinov2-small"), family="hf")
    hf_file = export_model(hf_spec, tmp_path / "hf.onnx").path

    timm_explainer, hf_explainer = Explainer(timm_file, device="cpu"), Explainer(hf_file, device="cpu")
    assert hf_explainer.metadata.grid_size == timm_explainer.metadata.grid_size == (8, 8)
    images = sorted(SHARED_IMAGES.glob("*.png"))
    pixels = timm_explainer.preprocess(images) if images else torch.randn(3, 3, 112, 112).numpy()
    features = [5, 200, 383][: len(pixels)] * 2
    logits = [e.session.run(pixels, None).logits for e in (timm_explainer, hf_explainer)]
    assert float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max()) < 1e-4
    for method, kwargs in (
        ("rollout", dict(head_fusion="max", discard_ratio=0.0)), ("rollout", dict(head_fusion="min", discard_ratio=0.0)),
        ("grad_rollout", dict(head_fusion="mean", discard_ratio=0.0, category_index=features[: len(pixels)])),
        ("gae", dict(category_index=features[: len(pixels)])), ("attention", dict(head_fusion="mean")),
    ):
        ours = hf_explainer.explain(pixels, method=method, **kwargs).masks
        theirs = timm_explainer.explain(pixels, method=method, **kwargs).masks
        error = float(np.abs(ours - theirs).max())
        parity_record("dinov2 real (hf vs timm)", "mask max diff", error)
        assert error <= 1e-4, (method, kwargs, error)
