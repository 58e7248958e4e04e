"""``vit-explain serve``: the explanation service (KServe V1 ``:explain``) on uvicorn.

Everything is checked before a port is bound: the flags, each model file (one ``Error:`` line for
a bad one), the address (one line if it is taken). SIGTERM stops accepting, answers what is in
flight and exits 0; Ctrl-C does the same and exits 130, as the other commands do.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import click

from ..errors import VitExplainError
from .common import device_option, fail, logger, set_quiet


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one, printed).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most instances in one graph call, across concurrent requests.")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Longest wait for a batch to fill, from its first instance.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests in flight; more are answered 503 with Retry-After at once.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True,
              help="Largest request body (413 beyond).")
@click.option("--max-images", type=click.IntRange(min=1), default=32, show_default=True, help="Instances per request.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Largest image (width x height), from its header. [default: Pillow's limit, 178956970]")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Per request, from admission to answer (504 beyond).")
@device_option
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime threads per model [default: every core].")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def serve(models, host, port, max_batch, max_delay_ms, max_queue, max_body_mb, max_images, max_pixels, timeout_s,
          device, threads, quiet) -> None:
    """Serve exported models over HTTP: KServe V1 :predict and :explain, V2 health and metadata.

    Each model is served under its file's stem (models/deit_tiny.onnx: /v1/models/deit_tiny:explain).
    Instances from concurrent requests with the same settings share one graph call.
    """
    import uvicorn

    from ..model_store import check_not_checkpoint
    from ..runtime.images import DEFAULT_MAX_PIXELS
    from ..serve import ServeConfig, create_app, model_names

    set_quiet(quiet)
    try:
        named = model_names(models)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="MODELS") from None
    config = ServeConfig(
        max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue, max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_images=max_images, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, timeout_s=timeout_s,
    )
    try:
        for path in named.values():
            check_not_checkpoint(Path(path))
        app = create_app(named, config, device=device, threads=threads)
    except VitExplainError as exc:
        raise fail(exc) from None
    listener = _bind(host, port)
    bound_host, bound_port = listener.getsockname()[:2]
    for name, path in named.items():
        logger.info("serving %s (%s) at http://%s:%d/v1/models/%s:explain", name, path, bound_host, bound_port, name)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=timeout_s))
    terminated = []
    # uvicorn catches SIGTERM, drains, restores the handler it found and raises the signal again:
    # with this handler there, that second delivery is noted instead of killing the process.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        server.run(sockets=[listener])
    finally:
        signal.signal(signal.SIGTERM, previous)
        listener.close()
    logger.info("stopped%s", " on SIGTERM after answering the requests in flight" if terminated else "")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: an address in use is one line, not a uvicorn traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as exc:
        raise fail(VitExplainError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")) from None
    return listener
