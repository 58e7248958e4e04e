"""vit-explain: where a Vision Transformer looked.

Attention Rollout and Gradient Attention Rollout on an ONNX-exported engine. The
``vit_explain.runtime`` package explains with onnxruntime and numpy only;
``vit_explain.export`` (needs the ``export`` extra: torch + timm) writes the models.
"""

__version__ = "0.1.0"
