"""The ASGI app: KServe's V1 ``:predict`` / ``:explain`` verbs, V2 health and metadata, metrics.

``create_app(models)`` opens every model (a bad file fails here, before any port is bound) and
returns a Starlette app a service can run or mount. A request goes: model lookup (404) ->
admission against ``max_queue`` requests in flight (503 with ``Retry-After`` at once, never a
wait) -> the body, read up to ``max_body_bytes`` (413) -> JSON and instance checks, base64 and
image decoding on the worker pool (400 naming the instance; a bad request never reaches the
graph, so it cannot harm others) -> the model's :class:`~.batcher.MicroBatcher` (a graph call
shared with concurrent requests of the same settings) -> rendering on the pool -> the answer.
The whole request is bounded by ``timeout_s`` (504). Every refusal is one-line JSON
``{"error": ...}`` and counted by reason in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import first_line
from ..methods import METHOD_NAMES
from ..runtime import Explainer
from ..runtime.images import DEFAULT_MAX_PIXELS
from .batcher import MicroBatcher
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import RequestError, parse_body, parse_instances
from .work import batch_key, prepare, render, run_batch

__all__ = ["ServeConfig", "ServedModel", "create_app", "model_names"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits and batching; the CLI's flags, with the same defaults."""

    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 64  # requests admitted and not yet answered
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 32  # instances per request
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # per image, from its header (Pillow's bomb guard)
    timeout_s: float = 60.0  # per request, from admission to answer
    retry_after_s: int = 1
    workers: int | None = None  # decoding / rendering threads (default: the CPU count)


@dataclass
class ServedModel:
    name: str
    path: str
    explainer: Explainer
    owned: bool  # opened by create_app, so closed at shutdown
    batcher: MicroBatcher | None = None


def model_names(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """``{name: path}``, the name being the file's stem; two files with one stem are refused."""
    named: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem
        if name in named:
            raise ValueError(f"two models would be served as {name!r}: {named[name]} and {path}")
        named[name] = str(path)
    return named


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


#: Metrics reason per refusal status.
_REASONS = {400: "bad_request", 404: "unknown_model", 413: "too_large", 503: "queue_full", 504: "timeout"}


class _Server:
    """The app's state and handlers (one per :func:`create_app`)."""

    def __init__(self, models: dict[str, ServedModel], config: ServeConfig) -> None:
        self.models, self.config, self.metrics = models, config, Metrics()
        self.pool = ThreadPoolExecutor(config.workers or os.cpu_count() or 1, thread_name_prefix="vit-explain-serve")
        self.in_flight = 0
        self.ready = True  # the models are open; False once shutting down

    # -- lifetime ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        for model in self.models.values():
            self._batcher(model)
        try:
            yield
        finally:  # after the server has answered every request in flight
            await self.close()

    def _batcher(self, model: ServedModel) -> MicroBatcher:
        """The model's batcher, made in the running loop: at startup, or on the first request
        when the app is mounted in another (Starlette runs no lifespan of a mounted app)."""
        if model.batcher is None:
            model.batcher = MicroBatcher(
                functools.partial(run_batch, model.explainer), self.config.max_batch, self.config.max_delay_ms / 1000,
                model.name, self.metrics.batch_size.labels(model.name).observe,
            )
        return model.batcher

    async def close(self) -> None:
        """Not ready any more; queued work finished, threads stopped, models this app opened closed."""
        self.ready = False
        for model in self.models.values():
            if model.batcher is not None:
                await model.batcher.close()
            if model.owned:
                model.explainer.close()
        self.pool.shutdown(wait=True)

    async def _off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(function, *args))

    # -- small endpoints -------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready_endpoint(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"models": list(self.models)})

    def _model(self, request: Request) -> ServedModel:
        name = request.path_params["name"]
        if name not in self.models:
            raise RequestError(f"unknown model {name!r} (served: {', '.join(self.models)})", 404)
        return self.models[name]

    async def model_status(self, request: Request) -> Response:
        try:
            model = self._model(request)
        except RequestError as exc:
            return self._refuse(exc)
        return JSONResponse({"name": model.name, "ready": self.ready})

    async def model_metadata(self, request: Request) -> Response:
        try:
            model = self._model(request)
        except RequestError as exc:
            return self._refuse(exc)
        meta = model.explainer.metadata
        return JSONResponse({
            "name": model.name, "versions": [], "platform": "onnxruntime",
            "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "mask", "datatype": "FP32", "shape": [-1, *meta.grid_size]}],
            "input_size": list(meta.preprocess.input_size), "grid": list(meta.grid_size),
            "output_kind": meta.output_kind, "num_outputs": meta.num_outputs,
            "classes": list(meta.class_names), "layers": meta.num_layers, "methods": list(METHOD_NAMES),
            "source_model": meta.source_model, "weights": meta.weights,
        })

    async def metrics_endpoint(self, request: Request) -> Response:
        for model in self.models.values():
            if model.batcher is not None:
                self.metrics.queue_depth.labels(model.name).set(model.batcher.queued)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- the verbs -------------------------------------------------------------------------
    async def explain(self, request: Request) -> Response:
        return await self._verb(request, explain=True)

    async def predict(self, request: Request) -> Response:
        return await self._verb(request, explain=False)

    def _refuse(self, exc: RequestError) -> JSONResponse:
        self.metrics.rejections.labels(exc.reason or _REASONS.get(exc.status, str(exc.status))).inc()
        headers = {"Retry-After": str(self.config.retry_after_s)} if exc.status == 503 else None
        return _error(str(exc), exc.status, headers)

    async def _verb(self, request: Request, explain: bool) -> Response:
        started = time.perf_counter()
        try:
            model = self._model(request)
            if not self.ready:
                raise RequestError("the server is shutting down", 503, "shutting_down")
            if self.in_flight >= self.config.max_queue:
                raise RequestError(f"the server is at its limit of {self.config.max_queue} requests in flight: retry later", 503)
        except RequestError as exc:
            return self._refuse(exc)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await self._answer(request, model, explain)
        except TimeoutError:
            return self._refuse(RequestError(f"no answer within the server's limit of {self.config.timeout_s:g} s", 504))
        except RequestError as exc:
            return self._refuse(exc)
        except Exception as exc:  # noqa: BLE001 - one line for the client, the traceback in the log
            logger.exception("%s: request failed", model.name)
            self.metrics.rejections.labels("error").inc()
            return _error(f"internal error: {first_line(exc)}", 500)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            seconds = self.metrics.explain_seconds if explain else self.metrics.predict_seconds
            seconds.labels(model.name).observe(time.perf_counter() - started)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = RequestError(f"the request body is larger than the server's limit of {limit} bytes", 413)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, request: Request, model: ServedModel, explain: bool) -> Response:
        body = await self._read_body(request)
        payload = await self._off_loop(parse_body, body)
        instances = parse_instances(payload, self.config.max_images, with_settings=explain)
        outcomes = await asyncio.gather(
            *(self._off_loop(prepare, inst, model.explainer, self.config.max_pixels, explain) for inst in instances),
            return_exceptions=True,
        )
        for outcome in outcomes:  # the first bad instance by index, as the error names it
            if isinstance(outcome, BaseException):
                raise outcome
        batcher = self._batcher(model)
        futures = [batcher.submit(batch_key(item), [item])[0] for item in outcomes]
        try:
            results = await asyncio.gather(*futures)
        finally:
            for future in futures:  # a timeout: leave the queue, the graph need not run for us
                future.cancel()
        rendered = await asyncio.gather(
            *(self._off_loop(render, item, result, model.explainer) for item, result in zip(outcomes, results, strict=True))
        )
        answer = {"predictions": [prediction for prediction, _ in rendered]}
        if explain:
            answer["explanations"] = [explanation for _, explanation in rendered]
        content = await self._off_loop(lambda: json.dumps(answer, separators=(",", ":")).encode())
        return Response(content, media_type="application/json")


def _open(models, device: str, threads: int | None) -> dict[str, ServedModel]:
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = model_names(models)
    if not named:
        raise ValueError("no models to serve")
    served = {}
    try:
        for name, model in named.items():
            if isinstance(model, Explainer):
                served[name] = ServedModel(name, str(model.session.path), model, owned=False)
            else:
                served[name] = ServedModel(name, str(model), Explainer(model, device=device, threads=threads), owned=True)
    except BaseException:
        for opened in served.values():
            if opened.owned:
                opened.explainer.close()
        raise
    return served


def create_app(
    models: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike | Explainer],
    config: ServeConfig | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> Starlette:
    """The ASGI app serving ``models``: model files (named by their stems), or ``{name: file or
    Explainer}``. Files are opened now (a bad one raises its one-line ``ModelFileError``) and
    closed at the app's shutdown; Explainers given are left open for their owner."""
    server = _Server(_open(models, device, threads), config or ServeConfig())

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _error(exc.detail, exc.status_code)

    routes = [
        Route("/v2/health/live", server.live),
        Route("/v2/health/ready", server.ready_endpoint),
        Route("/v1/models", server.list_models),
        Route("/v1/models/{name}:explain", server.explain, methods=["POST"]),
        Route("/v1/models/{name}:predict", server.predict, methods=["POST"]),
        Route("/v1/models/{name}", server.model_status),
        Route("/v2/models/{name}", server.model_metadata),
        Route("/metrics", server.metrics_endpoint),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers={HTTPException: not_found})
    app.state.server = server
    return app
