"""The export's last-block rewrite (:mod:`vit_explain.families.timm_last_block`): which models it applies
to, that it changes no output of the eager model, that it reaches the traced graph, and that it
leaves the model as it found it. The exported graphs' parity with the unmodified eager model, for
every family, is tested in ``test_parity.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from tests.helpers.models import FAMILIES  # noqa: E402
from vit_explain.eager import AttentionRecorder  # noqa: E402
from vit_explain.export.tracing import trace_explain_graph  # noqa: E402
from vit_explain.export.verify import relative_error  # noqa: E402
from vit_explain.families import timm_last_block as last_block  # noqa: E402
from vit_explain.families.timm_last_block import head_tokens_only, tokens_read_by_head  # noqa: E402

#: Leading tokens the head reads: the class token, the distillation token too, the registers with
#: the class token (kept: they are prefix tokens); None where the model is traced unchanged
#: (average pooling, or a model class other than timm's VisionTransformer).
EXPECTED_KEEP = {
    "deit": 1,
    "deit-seed1": 1,
    "deit-distilled": 2,
    "dinov2-reg4": 5,
    "vit-gap": None,
    "beit": None,
    "eva02": None,
}


def test_every_family_is_listed():
    assert set(EXPECTED_KEEP) == set(FAMILIES)


def _pixels(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _logits_and_attentions(model, pixels, weights):
    """Logits, attentions and attention gradients of the eager model, as the export computes them."""
    with AttentionRecorder(model) as recorder:
        recorder.reset()
        with torch.enable_grad():
            logits = model(pixels.clone().requires_grad_(True))
            attentions = list(recorder.attentions)
            gradients = torch.autograd.grad((logits * weights).sum(), attentions)
    return logits.detach(), [a.detach() for a in attentions], list(gradients)


def test_tokens_read_by_head(family_key):
    assert tokens_read_by_head(FAMILIES[family_key].build()) == EXPECTED_KEEP[family_key]


@pytest.mark.parametrize("key", ["deit", "deit-distilled", "dinov2-reg4"])
def test_rewrite_changes_no_output_and_is_undone(key):
    model = FAMILIES[key].build()
    keep = EXPECTED_KEEP[key]
    last = model.blocks[-1]
    pixels = _pixels(model)
    weights = torch.randn(2, model.num_classes or model.num_features, generator=torch.Generator().manual_seed(1))
    before = _logits_and_attentions(model, pixels, weights)

    seen: list[tuple[int, ...]] = []
    record = lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape))  # noqa: E731
    hooks = [last.attn.proj.register_forward_hook(record), last.mlp.register_forward_hook(record)]
    try:
        with head_tokens_only(model, pixels) as rewritten:
            seen.clear()  # the attention replica's check ran the block on every token
            assert rewritten
            during = _logits_and_attentions(model, pixels, weights)
    finally:
        for hook in hooks:
            hook.remove()
    # The attention's output projection and the MLP ran on the head's tokens only.
    assert seen == [(2, keep, model.embed_dim)] * 2
    assert "forward" not in vars(last)  # timm's own forward again
    after = _logits_and_attentions(model, pixels, weights)

    tokens = before[1][-1].shape[-1]
    # The last MLP's products run on `keep` rows instead of N, so float32 sums may round apart:
    # errors relative to each tensor's peak, at float32 noise (the export's check allows 1e-4).
    for other in (during, after):
        assert relative_error(other[0].numpy(), before[0].numpy()) < 2e-6
        for layer in range(len(model.blocks)):
            assert other[1][layer].shape[-2:] == (tokens, tokens)  # full maps, every layer
            assert relative_error(other[1][layer].numpy(), before[1][layer].numpy()) < 2e-6
            assert relative_error(other[2][layer].numpy(), before[2][layer].numpy()) < 2e-6
    # The last layer's gradient has no other rows than the head's tokens' in either form.
    assert torch.count_nonzero(before[2][-1][:, :, keep:]) == 0
    assert torch.count_nonzero(during[2][-1][:, :, keep:]) == 0


@pytest.mark.parametrize("key", ["vit-gap", "eva02"])
def test_other_models_are_traced_unchanged(key):
    model = FAMILIES[key].build()
    with head_tokens_only(model, _pixels(model)) as rewritten:
        assert not rewritten
        assert "forward" not in vars(model.blocks[-1])


def test_traced_graph_runs_the_last_mlp_on_the_class_token_only():
    """The rewrite reaches the graph that is exported: the last GELU sees ``[B, 1, hidden]``."""
    model = FAMILIES["deit-seed1"].build()
    graph = trace_explain_graph(model, _pixels(model), model.num_classes)
    gelus = [node for node in graph.graph.nodes if node.op == "call_function" and "gelu" in str(node.target)]
    forward_gelus = [node for node in gelus if "backward" not in str(node.target)]
    shapes = [tuple(node.meta["val"].shape[1:]) for node in forward_gelus]
    hidden = model.blocks[0].mlp.fc1.out_features
    tokens = 1 + model.patch_embed.num_patches
    assert shapes == [(tokens, hidden)] * (len(model.blocks) - 1) + [(1, hidden)]
    # ... and the last attention weights the values for the class token's query only.
    head_dim = model.blocks[-1].attn.head_dim
    products = [tuple(node.meta["val"].shape[-2:]) for node in graph.graph.nodes if "bmm" in str(node.target)]
    assert (1, head_dim) in products and (tokens, head_dim) in products
    assert "forward" not in vars(model.blocks[-1])


def test_an_attention_replica_that_disagrees_with_timm_is_not_used(monkeypatch):
    """Another timm version may compute attention differently from the replica: then only the MLP
    half is cut to the head's tokens, timm's own attention runs, and the outputs stay the same."""
    model = FAMILIES["deit"].build()
    replica = last_block._attend_for_prefix
    monkeypatch.setattr(last_block, "_attend_for_prefix", lambda *args: 1.5 * replica(*args))
    pixels = _pixels(model)
    weights = torch.randn(2, model.num_classes, generator=torch.Generator().manual_seed(1))
    before = _logits_and_attentions(model, pixels, weights)
    seen: list[tuple[int, ...]] = []
    record = lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape))  # noqa: E731
    hooks = [model.blocks[-1].attn.proj.register_forward_hook(record), model.blocks[-1].mlp.register_forward_hook(record)]
    try:
        with head_tokens_only(model, pixels) as rewritten:
            seen.clear()  # the replica check itself ran the attention on every token
            assert rewritten
            during = _logits_and_attentions(model, pixels, weights)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = 1 + model.patch_embed.num_patches
    assert seen == [(2, tokens, model.embed_dim), (2, 1, model.embed_dim)]  # timm's attention, MLP on 1 token
    assert relative_error(during[0].numpy(), before[0].numpy()) < 2e-6
    for layer in range(len(model.blocks)):
        assert relative_error(during[2][layer].numpy(), before[2][layer].numpy()) < 2e-6


def test_a_subclass_of_timms_vision_transformer_is_traced_unchanged():
    """A subclass may read other tokens in its own head: only timm's own classes are rewritten."""
    from timm.models.vision_transformer import VisionTransformer

    class ReadsEveryToken(VisionTransformer):
        def forward_head(self, x, pre_logits: bool = False):
            return self.head(x.mean(dim=1))

    model = ReadsEveryToken(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=3).eval()
    assert tokens_read_by_head(model) is None
    assert tokens_read_by_head(VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2)) == 1
