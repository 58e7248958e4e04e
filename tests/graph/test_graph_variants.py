"""The graphs derived from an exported file (``vit_explain/graph/``) and the selection in the discard.

- ``fused_maps``: the head-fused maps the graph returns equal the numpy fusion of its raw
  outputs, for every family, method and head fusion (max/min exactly, float64 products and means
  to summation order), and ``Explainer(fuse_in_graph=True)`` gives the masks of the raw path;
- ``gradients_inlined`` (the ``If`` replaced by its branch) computes exactly what the file does;
- ``forward_only`` keeps only what its outputs need;
- ``top1_class_weights`` picks the weights a forward pass would have, inside the one call;
- ``per_layer_outputs`` returns exactly the layers of the file's stacked outputs, on every family;
- ``kth_smallest`` equals ``np.partition`` on ties, zeros, negatives, NaN and both float widths;
- a CUDA session that silently fell back to the CPU is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vit_explain import graph as graph_variants
from vit_explain.errors import DeviceError, ModelFileError
from vit_explain.graph import (
    FUSED_OUTPUT,
    forward_only,
    fused_maps,
    gradients_inlined,
    per_layer_outputs,
)
from vit_explain.metadata import (
    INPUT_CLASS_WEIGHTS,
    INPUT_COMPUTE_GRADIENTS,
    INPUT_PIXELS,
    OUTPUT_ATTENTIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from vit_explain.methods.fusion import fuse_heads
from vit_explain.methods.fusion import weighted_head_mean as _weighted_head_mean
from vit_explain.methods.selection import _select_bracketed, kth_smallest
from vit_explain.runtime import Explainer
from vit_explain.runtime import session as session_module
from vit_explain.runtime.session import ModelSession

HEAD_FUSIONS = ["mean", "max", "min"]
#: Logits of two different graphs over the same weights: onnxruntime optimises each graph on its
#: own (BEiT's head, for one, is fused differently), so they agree to float32 noise, not bitwise.
LOGITS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _inputs(meta, batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, *meta.preprocess.input_size)).astype(np.float32)
    weights = np.zeros((batch, meta.num_outputs), dtype=np.float32)
    weights[np.arange(batch), rng.choice(meta.num_outputs, size=batch, replace=False)] = 1.0
    return pixels, weights


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def deit(export_family):
    return export_family("deit")


def test_fused_maps_equal_numpy_fusion_of_the_raw_outputs(export_family, family_key):
    exported = export_family(family_key)
    model = onnx.load(str(exported.path))
    session = ModelSession(exported.path, device="cpu")
    pixels, weights = _inputs(session.metadata)
    raw = session.run(pixels, weights)
    product = np.multiply(raw.attentions, raw.gradients, dtype=np.float64)
    for fusion in HEAD_FUSIONS:
        logits, fused = _session(fused_maps(model, "rollout", fusion)).run(None, {INPUT_PIXELS: pixels})
        expected = np.stack([fuse_heads(layer.astype(np.float64) if fusion == "mean" else layer, fusion)
                             for layer in raw.attentions])
        assert fused.dtype == (np.float64 if fusion == "mean" else np.float32)
        np.testing.assert_allclose(fused, expected, rtol=1e-14, atol=0)
        np.testing.assert_allclose(logits, raw.logits, **LOGITS_TOLERANCE)

        logits, fused = _session(fused_maps(model, "grad_rollout", fusion)).run(
            None, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights}
        )
        expected = np.maximum(np.stack([fuse_heads(layer, fusion) for layer in product]), 0.0)
        assert fused.dtype == np.float64 and fused.min() >= 0
        np.testing.assert_allclose(fused, expected, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(logits, raw.logits, **LOGITS_TOLERANCE)

    _, fused = _session(fused_maps(model, "gae", None)).run(None, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights})
    np.testing.assert_allclose(fused, np.maximum(product, 0.0).mean(axis=2), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_explainer_masks_are_the_same_with_heads_fused_in_the_graph(deit, start_layer):
    raw_path = Explainer(deit.path, device="cpu", fuse_in_graph=False, graph_batch=2)
    fused_path = Explainer(deit.path, device="cpu", fuse_in_graph=True, graph_batch=2)
    pixels, _ = _inputs(raw_path.metadata, batch=5, seed=1)  # 5 images: chunks of 2, 2 and 1
    categories = [3, 1, 4, 1, 5]
    cases = [("rollout", f, None) for f in HEAD_FUSIONS] + [("grad_rollout", f, categories) for f in HEAD_FUSIONS]
    cases += [("gae", None, categories), ("grad_rollout", "mean", None)]  # None: each image's top-1
    for method, fusion, category in cases:
        for discard in (0.0, 0.9) if method != "gae" else (None,):  # gae discards nothing (and refuses a ratio)
            a = raw_path.explain(pixels, method=method, head_fusion=fusion, discard_ratio=discard,
                                 category_index=category, start_layer=start_layer)
            b = fused_path.explain(pixels, method=method, head_fusion=fusion, discard_ratio=discard,
                                   category_index=category, start_layer=start_layer)
            np.testing.assert_allclose(b.masks, a.masks, rtol=0, atol=1e-6, err_msg=f"{method} {fusion} {discard}")
            np.testing.assert_allclose(b.logits, a.logits, **LOGITS_TOLERANCE)
            assert b.category_index == a.category_index
            assert a.masks.max() > 0


def test_per_layer_outputs_are_the_layers_of_the_files_stacks(export_family, family_key):
    """Every family's graph stacks its layers with the Concat + Reshape that ``per_layer_outputs``
    takes apart, and the per-layer outputs are exactly the slices of the file's stacked ones."""
    exported = export_family(family_key)
    model = onnx.load(str(exported.path))
    pixels, weights = _inputs(exported.metadata)
    num_layers = exported.metadata.num_layers
    layered, names = per_layer_outputs(gradients_inlined(model), [OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS], num_layers)
    assert all(names[group] is not None and len(names[group]) == num_layers for group in names)
    stacks = [list(node.input) for node in layered.graph.node if node.op_type == "Concat"]
    assert names[OUTPUT_ATTENTIONS] not in stacks and names[OUTPUT_GRADIENTS] not in stacks  # the copies are gone
    assert {o.name for o in layered.graph.output}.isdisjoint({OUTPUT_ATTENTIONS, OUTPUT_GRADIENTS})
    wanted = [OUTPUT_LOGITS, *names[OUTPUT_ATTENTIONS], *names[OUTPUT_GRADIENTS]]
    got = _session(layered).run(wanted, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights})
    logits, attentions, gradients = _session(model).run(
        None, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights, INPUT_COMPUTE_GRADIENTS: np.array(True)}
    )
    np.testing.assert_allclose(got[0], logits, **LOGITS_TOLERANCE)
    np.testing.assert_array_equal(np.stack(got[1 : 1 + num_layers]), attentions)
    np.testing.assert_array_equal(np.stack(got[1 + num_layers :]), gradients)
    # The session's runs use them, and stack them back for run().
    session = ModelSession(exported.path, device="cpu")
    stacked = session.run(pixels, weights)
    np.testing.assert_array_equal(stacked.gradients, gradients)
    assert session._layer_names["gradients"] == names


def test_top1_graph_explains_what_a_forward_pass_would_have_chosen(export_family, family_key):
    """The class weights the graph picks from its own logits (one-hot at the first maximum; the
    unit output vector for a feature model) give the gradients of those weights passed in, in
    one call: the Explainer makes no separate forward pass for the top-1 class any more."""
    exported = export_family(family_key)
    meta = exported.metadata
    pixels, _ = _inputs(meta, batch=3, seed=2)
    session = ModelSession(exported.path, device="cpu")
    chosen = session.run_layers(pixels, top1=True)
    logits = session.run_layers(pixels).logits
    if meta.output_kind == "logits":
        weights = np.zeros((3, meta.num_outputs), dtype=np.float32)
        weights[np.arange(3), logits.argmax(axis=1)] = 1.0
    else:
        norms = np.linalg.norm(logits, axis=1, keepdims=True)
        weights = (logits / np.where(norms > 0, norms, 1)).astype(np.float32)
    given = session.run_layers(pixels, weights)
    np.testing.assert_allclose(chosen.logits, given.logits, **LOGITS_TOLERANCE)
    scale = max(np.abs(np.stack(given.gradients)).max(), 1e-30)
    np.testing.assert_allclose(np.stack(chosen.gradients), np.stack(given.gradients), rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.stack(chosen.attentions), np.stack(given.attentions))

    explainer = Explainer(exported.path, device="cpu", threads=1)
    result = explainer.explain(pixels, method="grad_rollout")
    assert set(explainer.session._sessions) == {("gradients_top1", False)}  # one graph, one call
    if meta.output_kind == "logits":
        assert result.category_index == tuple(int(i) for i in result.logits.argmax(axis=1))
    else:
        assert result.category_index is None


def test_a_graph_without_the_stacking_pattern_keeps_its_stacked_output(deit):
    model = forward_only(onnx.load(str(deit.path)))
    _, names = per_layer_outputs(model, [OUTPUT_ATTENTIONS], deit.metadata.num_layers + 1)  # not L inputs
    assert names == {OUTPUT_ATTENTIONS: None}


def test_inlined_gradient_graph_computes_what_the_file_computes(deit):
    model = onnx.load(str(deit.path))
    pixels, weights = _inputs(deit.metadata)
    inlined = gradients_inlined(model)
    assert not any(node.op_type == "If" for node in inlined.graph.node)
    assert INPUT_COMPUTE_GRADIENTS not in {i.name for i in inlined.graph.input}
    expected = _session(model).run(
        None, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights, INPUT_COMPUTE_GRADIENTS: np.array(True)}
    )
    got = _session(inlined).run(None, {INPUT_PIXELS: pixels, INPUT_CLASS_WEIGHTS: weights})
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pruned_graphs_keep_only_what_their_outputs_need(deit):
    model = onnx.load(str(deit.path))
    forward = forward_only(model)
    assert {i.name for i in forward.graph.input} == {INPUT_PIXELS}
    assert not any(node.op_type == "If" for node in forward.graph.node)
    assert len(forward.graph.node) < len(model.graph.node)
    with pytest.raises(ValueError, match="no fused graph"):
        fused_maps(model, "attention", "mean")
    with pytest.raises(ValueError, match="head fusion"):
        fused_maps(model, "rollout", "median")
    with pytest.raises(ValueError, match="no gradient branch"):
        gradients_inlined(forward)
    assert FUSED_OUTPUT in {o.name for o in fused_maps(model, "rollout", "max").graph.output}


def test_a_forward_graph_that_reads_the_class_weights_is_refused():
    """An interface-conforming file whose logits depend on the class weights: no forward-only graph."""
    from onnx import TensorProto, helper

    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])  # noqa: E731
    graph = helper.make_graph(
        [
            helper.make_node("Add", [INPUT_PIXELS, INPUT_CLASS_WEIGHTS], [OUTPUT_LOGITS]),
            helper.make_node("Identity", [INPUT_PIXELS], ["attentions"]),
            helper.make_node("Identity", [INPUT_CLASS_WEIGHTS], ["attention_gradients"]),
        ],
        "bad",
        [tensor(INPUT_PIXELS), tensor(INPUT_CLASS_WEIGHTS),
         helper.make_tensor_value_info(INPUT_COMPUTE_GRADIENTS, TensorProto.BOOL, [])],
        [tensor(OUTPUT_LOGITS), tensor("attentions"), tensor("attention_gradients")],
    )
    with pytest.raises(ModelFileError, match="reads the class weights"):
        forward_only(helper.make_model(graph))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["normal", "relu", "mostly_zero", "all_zero", "ties", "negative_ties", "nan"])
def test_kth_smallest_equals_a_full_partition(kind, dtype):
    rng = np.random.default_rng(7)
    values = rng.standard_normal((4, 5000))
    if kind == "relu":
        values = np.maximum(values, 0)
    elif kind == "mostly_zero":
        values = np.maximum(values - 2.5, 0)
    elif kind == "all_zero":
        values[:] = 0
    elif kind == "ties":
        values = np.maximum(np.round(values, 1), 0)
    elif kind == "negative_ties":
        values = np.round(values, 1)
    elif kind == "nan":
        values[:, ::97] = np.nan
    values = values.astype(dtype)
    for index in (0, 1, 2499, 4500, 4999):
        expected = np.partition(values, index, axis=1)[:, index : index + 1]
        got = kth_smallest(values, index)
        assert got.dtype == values.dtype and got.shape == (4, 1)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["attention_like", "relu_products", "unlucky_sample", "sample_all_low"])
def test_kth_smallest_on_map_sized_rows(kind):
    """Rows as long as a DeiT map (197 x 197), where the sampled bracket is used, including rows
    built so that the strided sample misses the wanted rank (the exact fallback must answer)."""
    rng = np.random.default_rng(3)
    n = 197 * 197
    values = rng.dirichlet(np.full(197, 0.3), size=(3, 197)).reshape(3, n).astype(np.float32)
    if kind == "relu_products":
        values = np.maximum(values.astype(np.float64) * rng.standard_normal((3, n)), 0)
    step = n // 1024
    if kind == "unlucky_sample":
        values[:, ::step] = 10.0  # the sample sees only the largest values
    elif kind == "sample_all_low":
        values[:, ::step] = -1.0  # ... or only the smallest
    for index in (0, 7, n // 2, int(n * 0.9) - 1, n - 3, n - 1):
        expected = np.partition(values, index, axis=1)[:, index : index + 1]
        np.testing.assert_array_equal(kth_smallest(values, index), expected)


@pytest.mark.parametrize("stop", [1, 4, 1000])
@pytest.mark.parametrize(
    "kind", ["uniform", "ties", "all_equal", "unlucky_sample", "sample_all_low", "nan_in_sample", "nan_off_sample", "short"]
)
def test_bisected_bracket_selects_exactly(kind, stop):
    """:func:`_select_bracketed` with a small sample, bisected down to 1 or 4 sample positions
    (or not at all): exact on plain data, on ties, where its sample misses the rank, with NaN in
    or out of the sample (NaN sorts last), and on a row too short to sample."""
    rng = np.random.default_rng(11)
    values = rng.random(5000)
    sample_size = 256
    step = values.size // sample_size
    if kind == "ties":
        values = np.round(values, 2)
    elif kind == "all_equal":
        values[:] = 0.25
    elif kind == "unlucky_sample":
        values[::step] = 2.0
    elif kind == "sample_all_low":
        values[::step] = -1.0
    elif kind == "nan_in_sample":
        values[::step * 7] = np.nan
    elif kind == "nan_off_sample":
        values[1::step * 7] = np.nan
    elif kind == "short":
        values = values[: 3 * sample_size]  # fewer than 4 entries a sample step: selected directly
    for rank in (0, 1, values.size // 3, values.size // 2, int(values.size * 0.9) - 1, values.size - 2, values.size - 1):
        got = _select_bracketed(values, rank, sample_size, stop)
        np.testing.assert_array_equal(got, np.partition(values, rank)[rank])


def test_weighted_head_mean_equals_numpy_mean_of_the_products():
    rng = np.random.default_rng(5)
    attention = rng.random((2, 4, 9, 9)).astype(np.float32)
    gradient = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    product = np.multiply(attention, gradient, dtype=np.float64)
    np.testing.assert_array_equal(_weighted_head_mean(attention, gradient, clamp_heads=False), product.mean(axis=1))
    np.testing.assert_array_equal(
        _weighted_head_mean(attention, gradient, clamp_heads=True), np.maximum(product, 0).mean(axis=1)
    )


def test_each_variant_is_derived_once_per_model_and_kind(deit, monkeypatch):
    """The single- and multi-threaded sessions of a kind share one derivation, and calls derive
    nothing; the derived graph (a copy of the weights) is dropped once both sessions exist."""
    derived: list = []
    real = session_module.derive
    monkeypatch.setattr(session_module, "derive", lambda model, kind, *a: derived.append(kind) or real(model, kind, *a))
    session = ModelSession(deit.path, device="cpu")
    pixels, weights = _inputs(deit.metadata, batch=2)
    for single_thread in (False, True, False, True):
        session.run_layers(pixels, single_thread=single_thread)
        session.run_layers(pixels, weights, single_thread=single_thread)
        session.run_fused(pixels, "rollout", "max", single_thread=single_thread)
    assert derived == ["forward", "gradients", ("fused", "rollout", "max", False)]
    assert session._derived == {}


def test_a_cuda_session_that_fell_back_to_the_cpu_is_refused(deit, monkeypatch):
    class FallenBack(ort.InferenceSession):
        def __init__(self, source, options, providers):
            super().__init__(source, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session_module, "resolve_providers", lambda device: [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    monkeypatch.setattr(session_module.ort, "InferenceSession", FallenBack)
    session = ModelSession(deit.path, device="cuda")
    assert session.uses_cuda
    with pytest.raises(DeviceError, match="could not start"):
        session.run(_inputs(deit.metadata)[0])


def test_cuda_providers_ask_for_full_float32(monkeypatch):
    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for device in ("cuda", "auto"):
        providers = session_module.resolve_providers(device)
        assert providers[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
        assert providers[1] == "CPUExecutionProvider"
    assert session_module.resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert graph_variants.FUSED_METHODS == ("rollout", "grad_rollout", "gae")


def test_graph_batch_defaults_by_device_and_refuses_zero(deit):
    assert Explainer(deit.path, device="cpu").graph_batch == 8
    with pytest.raises(ValueError, match="graph_batch must be at least 1"):
        Explainer(deit.path, device="cpu", graph_batch=0)


def test_io_binding_path_returns_what_run_returns(deit, monkeypatch):
    """The CUDA path binds every output by name (one per layer, and the top-1 graphs have no class
    weights input); run on the CPU provider here, it must return exactly what ``session.run`` does."""
    session = ModelSession(deit.path, device="cpu")
    pixels, weights = _inputs(deit.metadata, batch=2)
    expected = [session.run_layers(pixels, weights), session.run_layers(pixels, top1=True)]
    expected_fused = session.run_fused(pixels, "grad_rollout", "mean", top1=True)
    monkeypatch.setattr(session, "_run", session._run_bound)
    got = [session.run_layers(pixels, weights), session.run_layers(pixels, top1=True)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.logits, b.logits)
        for x, y in zip(a.attentions + a.gradients, b.attentions + b.gradients, strict=True):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(session.run_fused(pixels, "grad_rollout", "mean", top1=True), expected_fused, strict=True):
        np.testing.assert_array_equal(x, y)
