"""The server's life: refusing bad model files and addresses at startup with one line, draining on
SIGTERM and exiting 0, and ``create_app`` mounted inside another Starlette app."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from vit_explain.runtime import Explainer
from vit_explain.runtime.images import load_image_bytes

from .server import env, instance, metric, png_bytes, running_server, serve_command


@pytest.fixture(scope="module")
def model(export_family):
    return export_family("deit").path


def _start_fails(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(serve_command(*args), capture_output=True, text=True, env=env(), timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    return run


def test_startup_refuses_a_bad_model_file_with_one_line(tmp_path, model):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    run = _start_fails(str(not_onnx), "--port", "0")
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("Error:") and "notes.onnx" in run.stderr
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    run = _start_fails(str(checkpoint), "--port", "0")
    assert run.stderr.startswith("Error:") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    twin = tmp_path / "other" / model.name
    twin.parent.mkdir()
    twin.write_bytes(model.read_bytes())
    run = _start_fails(str(model), str(twin), "--port", "0")
    assert run.returncode == 2 and "two models would be served as 'deit'" in run.stderr, run.stderr


def test_an_address_in_use_is_one_line(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        run = _start_fails(str(model), "--port", str(taken.getsockname()[1]))
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("Error: cannot listen on 127.0.0.1:")


def test_sigterm_answers_every_request_in_flight_then_exits_0(model):
    """Requests held in the batching window when SIGTERM comes are all answered (200), the
    process exits 0 (not by the signal uvicorn raises again after draining), and no new
    connection is accepted afterwards."""
    photos = [png_bytes(60 + i) for i in range(4)]
    with running_server(str(model), "--max-delay-ms", "1500") as server:
        url = f"{server.url}/v1/models/deit:explain"
        with ThreadPoolExecutor(len(photos)) as pool:
            pending = [pool.submit(httpx.post, url, json={"instances": [instance(data, category_index=1)]}, timeout=120)
                       for data in photos]
            deadline = time.monotonic() + 30
            while metric(httpx.get(f"{server.url}/metrics").text, "vit_explain_requests_in_flight") < len(photos):
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            responses = [future.result() for future in pending]
        _, stderr = server.process.communicate(timeout=60)  # no second signal: the first must do
        assert server.process.returncode == 0, stderr
        assert "Traceback" not in stderr
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/v2/health/live", timeout=5)
    with Explainer(model, device="cpu", threads=2) as explainer:
        for data, response in zip(photos, responses, strict=True):
            assert response.status_code == 200, response.text
            expected = explainer.explain([load_image_bytes(data)], category_index=1).masks[0]
            assert np.abs(np.asarray(response.json()["explanations"][0]["mask"]) - expected).max() <= 1e-6


def test_create_app_mounts_inside_another_app(model):
    """A service mounts the app under a prefix. Starlette runs no lifespan for a mounted app: the
    batcher then starts on the first request, and a parent that runs the app's lifespan inside its
    own (as the README shows) closes it cleanly."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from vit_explain.serve import ServeConfig, create_app

    data = png_bytes(70)
    with Explainer(model, device="cpu", threads=2) as explainer:
        expected = explainer.explain([load_image_bytes(data)]).masks[0]
        for with_lifespan in (False, True):
            inner = create_app({"vit": explainer}, ServeConfig(max_delay_ms=0))

            @asynccontextmanager
            async def lifespan(app, inner=inner):
                async with inner.router.lifespan_context(inner):
                    yield

            outer = Starlette(routes=[Mount("/explainer", app=inner)], lifespan=lifespan if with_lifespan else None)
            with TestClient(outer) as client:
                assert client.get("/explainer/v1/models").json() == {"models": ["vit"]}
                response = client.post("/explainer/v1/models/vit:explain", json={"instances": [instance(data)]})
            assert response.status_code == 200, response.text
            assert np.abs(np.asarray(response.json()["explanations"][0]["mask"]) - expected).max() <= 1e-6
            assert inner.state.server.ready is not with_lifespan  # closed with its parent's lifespan
        # the app leaves an Explainer it was given open for its owner
        assert explainer.explain([load_image_bytes(data)]).masks.shape == (1, 14, 14)
