"""``vit-explain serve``: explanations over HTTP, in KServe's V1 protocol, batched across requests.

``create_app(models)`` returns the ASGI app (Starlette), so a Python service can mount it; the
``serve`` command runs it with uvicorn. Needs the ``[serve]`` extra (Starlette, uvicorn,
prometheus-client). Never imports torch: the server is the runtime behind a socket.
"""

from __future__ import annotations

from .app import ServeConfig, create_app, model_names

__all__ = ["ServeConfig", "create_app", "model_names"]
