"""``vit-explain serve`` end to end: the real server on a loopback port, the answers checked
against :meth:`Explainer.explain` run here on the same image bytes, and every refusal the issue
lists (one-line JSON naming the instance, the right status, the server unharmed)."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from vit_explain.outputs.placement import model_box
from vit_explain.runtime import Explainer
from vit_explain.runtime.images import load_image_bytes

from .server import instance, metric, png_bytes, running_server

#: Masks served must be the Python API's to this (the issue's bound); both are scaled to max 1.
MASK_TOL = 1e-6
LIMITS = ("--max-body-mb", "1", "--max-images", "4", "--max-pixels", "1000000")


@pytest.fixture(scope="module")
def model(export_family):
    return export_family("deit").path


@pytest.fixture(scope="module")
def server(model):
    with running_server(str(model), *LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def explainer(model):
    with Explainer(model, device="cpu", threads=2) as opened:
        yield opened


def _explain(server, *instances, name="deit", **parameters) -> httpx.Response:
    body = {"instances": list(instances), **({"parameters": parameters} if parameters else {})}
    return httpx.post(f"{server.url}/v1/models/{name}:explain", json=body, timeout=120)


def _check_explanation(answer: dict, prediction: dict, data: bytes, explainer: Explainer, **settings) -> None:
    """One served explanation against the Python API on the same bytes and settings."""
    image = load_image_bytes(data)
    expected = explainer.explain([image], **settings)
    mask = np.asarray(answer["mask"], dtype=np.float64)
    assert answer["mask_shape"] == list(expected.masks.shape[1:]) == list(mask.shape)
    assert np.abs(mask - expected.masks[0]).max() <= MASK_TOL
    assert answer["method"] == expected.method
    assert answer["settings"] == expected.settings()
    assert answer["category_index"] == (expected.category_index[0] if expected.category_index else None)
    assert answer["crop_window"] == pytest.approx(list(model_box(image.size, explainer.metadata)), abs=1e-4)
    top = expected.top_k(5)[0]
    assert [(p["index"], p["name"]) for p in prediction["top_k"]] == [(i, n) for i, n, _ in top]
    assert [p["probability"] for p in prediction["top_k"]] == pytest.approx([p for *_, p in top], abs=1e-6)


def test_health_models_and_metadata(server, explainer):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": ["deit"]}
    assert httpx.get(f"{server.url}/v1/models/deit").json() == {"name": "deit", "ready": True}
    meta = httpx.get(f"{server.url}/v2/models/deit").json()
    assert meta["grid"] == list(explainer.metadata.grid_size)
    assert meta["input_size"] == list(explainer.metadata.preprocess.input_size)
    assert len(meta["classes"]) == explainer.metadata.num_outputs
    assert meta["methods"] == ["rollout", "grad_rollout", "gae", "attention"]


def test_every_method_in_one_request_gives_the_python_apis_masks(server, explainer):
    photos = [png_bytes(seed, size) for seed, size in enumerate([(200, 150), (150, 260), (224, 224), (97, 131)])]
    cases = [
        {},  # rollout, the defaults
        {"method": "grad_rollout", "category_index": 243, "discard_ratio": 0.5},
        {"method": "gae", "start_layer": 1},
        {"method": "attention", "head_fusion": "max"},
    ]
    response = _explain(server, *(instance(data, **case) for data, case in zip(photos, cases, strict=True)))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["predictions"]) == len(answer["explanations"]) == 4
    for data, case, prediction, explanation in zip(photos, cases, answer["predictions"], answer["explanations"], strict=True):
        assert "overlay_png" not in explanation
        _check_explanation(explanation, prediction, data, explainer, **case)


def test_parameters_are_defaults_and_overlay_is_the_photos_size(server, explainer):
    photos = [png_bytes(10), png_bytes(11, (120, 90))]
    response = _explain(
        server, instance(photos[0]), instance(photos[1], category_index=7),
        method="grad_rollout", head_fusion="max", overlay=True,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    first, second = answer["explanations"]
    # no category: the image's own top-1 class; the instance's own category wins over none
    _check_explanation(first, answer["predictions"][0], photos[0], explainer, method="grad_rollout", head_fusion="max")
    _check_explanation(second, answer["predictions"][1], photos[1], explainer, method="grad_rollout", head_fusion="max",
                       category_index=7)
    assert first["category_index"] == answer["predictions"][0]["top_k"][0]["index"]
    for data, explanation in zip(photos, answer["explanations"], strict=True):
        painted = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"]["b64"])))
        assert painted.format == "PNG" and painted.size == Image.open(io.BytesIO(data)).size


def test_predict_answers_the_top_k_only(server, explainer):
    data = png_bytes(20)
    body = {"instances": [instance(data)], "parameters": {"top_k": 3}}
    response = httpx.post(f"{server.url}/v1/models/deit:predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"predictions"}
    expected = explainer.explain([load_image_bytes(data)]).top_k(3)[0]
    assert [p["index"] for p in answer["predictions"][0]["top_k"]] == [i for i, _, _ in expected]


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        time.sleep(0.02)


def _refused(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and "\n" not in error
    for word in words:
        assert word in error, error
    return error


def test_every_bad_request_is_one_line_naming_the_instance(server):
    good = instance(png_bytes(30))
    url = f"{server.url}/v1/models/deit:explain"
    _refused(httpx.post(url, content=b"{not json"), 400, "not valid JSON")
    _refused(httpx.post(url, json=[1, 2]), 400, "JSON object")
    _refused(httpx.post(url, json={"instances": []}), 400, "non-empty")
    _refused(httpx.post(url, json={"instances": [good, {"image_bytes": {"b64": "@@not base64@@"}}]}), 400,
             "instance 1", "base64")
    _refused(_explain(server, good, instance(b"plain text, no image")), 400, "instance 1", "not an image")
    _refused(_explain(server, {"image_url": "http://example.com/cat.jpg"}), 400, "instance 0", "image_url")
    _refused(_explain(server, {"image_bytes": {"url": "http://example.com/cat.jpg"}}), 400, "instance 0",
             "URLs are not fetched")
    _refused(_explain(server, good, {**good, "category_index": 1000}), 400, "instance 1", "out of range", "0..999")
    _refused(_explain(server, {**good, "category_index": "7"}), 400, "instance 0", "must be an integer")
    _refused(_explain(server, {**good, "head_fusion": "median"}), 400, "instance 0", "head fusion")
    _refused(_explain(server, {**good, "discard_ratio": 1.0}), 400, "instance 0", "discard ratio")
    _refused(_explain(server, {**good, "method": "rollout", "category_index": 3}), 400, "instance 0", "category_index")
    _refused(_explain(server, {**good, "method": "gae", "head_fusion": "max"}), 400, "instance 0", "head_fusion")
    _refused(_explain(server, {**good, "start_layer": 3}), 400, "instance 0", "start layer")
    _refused(_explain(server, {**good, "method": "lrp"}), 400, "instance 0", "unknown method")
    _refused(_explain(server, good, method="lrp"), 400, "instance 0", "unknown method")
    _refused(_explain(server, good, overlay="yes"), 400, "overlay")
    _refused(_explain(server, good, name="nope"), 404, "unknown model 'nope'")
    # limits: images per request, body size (declared, and streamed without a length), pixels
    _refused(_explain(server, *[good] * 5), 413, "5 instances", "limit is 4")
    big = json.dumps({"instances": [instance(np.random.default_rng(0).bytes(800_000))]}).encode()
    _refused(httpx.post(url, content=big), 413, "larger than")
    _refused(httpx.post(url, content=iter([big[:500_000], big[500_000:]])), 413, "larger than")
    bomb = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(bomb, format="PNG")  # 1.2 megapixels, a few kB
    _refused(_explain(server, good, instance(bomb.getvalue())), 400, "instance 1", "exceeds the limit of 1000000")
    # the server is unharmed, and counted every refusal by reason
    assert _explain(server, good).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "vit_explain_rejections_total", reason="bad_request") >= 17
    assert metric(metrics, "vit_explain_rejections_total", reason="unknown_model") >= 1
    assert metric(metrics, "vit_explain_rejections_total", reason="too_large") >= 3
    assert metric(metrics, "request_explain_seconds_count", model_name="deit") >= 20


def test_concurrent_requests_share_graph_calls_and_a_bad_one_harms_none(model, explainer):
    """Six single-image requests at once, five good (four rollout, one grad_rollout) and one bad:
    within the batching window the four rollouts share calls, the bad one is refused alone."""
    photos = [png_bytes(40 + i) for i in range(5)]
    cases = [{}, {}, {}, {}, {"category_index": 5}]
    with running_server(str(model), "--max-delay-ms", "2500", "--max-batch", "8") as server:
        bodies = [{"instances": [instance(data, **case)]} for data, case in zip(photos, cases, strict=True)]
        bodies.insert(2, {"instances": [instance(b"GIF89a broken")]})
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(
                lambda body: httpx.post(f"{server.url}/v1/models/deit:explain", json=body, timeout=120), bodies))
        metrics = httpx.get(f"{server.url}/metrics").text
    _refused(responses.pop(2), 400, "instance 0")
    for data, case, response in zip(photos, cases, responses, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        _check_explanation(answer["explanations"][0], answer["predictions"][0], data, explainer, **case)
    calls = metric(metrics, "vit_explain_batch_size_count", model_name="deit")
    assert metric(metrics, "vit_explain_batch_size_sum", model_name="deit") == 5  # every good instance, once
    assert calls < 5, f"{calls} graph calls for 5 concurrent instances: nothing was batched"


def test_a_full_queue_answers_503_at_once_and_a_timeout_504(model):
    """``--max-queue 1``: while one request waits for its batch, the next is refused at once with
    Retry-After; the waiting one hits ``--timeout-s`` first (504) and leaves the queue unrun."""
    args = ("--max-queue", "1", "--max-delay-ms", "3000", "--timeout-s", "1.5")
    with running_server(str(model), *args) as server:
        url = f"{server.url}/v1/models/deit:explain"
        body = {"instances": [instance(png_bytes(50))]}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=body, timeout=60)
            _wait_for(lambda: metric(httpx.get(f"{server.url}/metrics").text, "vit_explain_requests_in_flight") == 1)
            second = httpx.post(url, json=body, timeout=60)
            _refused(second, 503, "limit of 1 requests in flight")
            assert second.headers["Retry-After"] == "1"
            assert second.elapsed.total_seconds() < 1.0
            _refused(first.result(), 504, "1.5 s")
        time.sleep(2.0)  # past the batching window: the timed-out instance must not have been run
        metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "vit_explain_rejections_total", reason="queue_full") == 1
    assert metric(metrics, "vit_explain_rejections_total", reason="timeout") == 1
    assert metric(metrics, "vit_explain_batch_size_count", model_name="deit") == 0
