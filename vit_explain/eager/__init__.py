"""Eager PyTorch helpers the exporter needs (hooks, introspection, hashing), apart from the
reference maths in :mod:`vit_explain.reference`, which tests and the benchmark use as the oracle."""

from .hooks import AttentionRecorder, attention_modules
from .introspection import pooling_of, reads_class_token, weights_sha256

__all__ = ["AttentionRecorder", "attention_modules", "pooling_of", "reads_class_token", "weights_sha256"]
