"""The torch-free runtime: onnxruntime for the graph, numpy for the rollout maths.

Services embed this package; it must never import torch or timm.
"""

from .explainer import Explainer, Explanation

__all__ = ["Explainer", "Explanation"]
