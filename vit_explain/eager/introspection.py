"""What an eager model says about itself: how its head reads the tokens, and a hash of its weights.

Both the exporter (the metadata it writes) and the reference (where its rollout starts) need
these answers, so they live apart from either.
"""

from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["pooling_of", "reads_class_token", "weights_sha256"]


def pooling_of(model: nn.Module) -> str:
    """How the head reads the tokens: "token" (the class token) or "avg"/"avgmax"/"max" (patch tokens)."""
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "cls_token", None) is None and pool == "token":
        return "avg"
    return str(pool)


def reads_class_token(model: nn.Module) -> bool:
    """Rollout starts from the class token's row only when the head reads that token.

    BEiT and EVA have a class token but pool the patch tokens by default; their output never
    sees the class token's final state, so their rollout starts, like a model without a class
    token, from the mean of the patch tokens' rows.
    """
    return getattr(model, "cls_token", None) is not None and pooling_of(model) == "token"


def weights_sha256(model: nn.Module) -> str:
    """A stable hash of a model's parameters and buffers (provenance in the exported artifact).

    It lives here, apart from the exporter, so that a process holding only the eager model (the
    benchmark's reference worker) can compute it without importing the ONNX exporter."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
