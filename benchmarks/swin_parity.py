"""Measure a full-size exported Swin against eager timm and the dense float64 oracle (the README's row).

    vit-explain export swin_tiny_patch4_window7_224 --weights random -o models/swin_t_random.onnx
    PYTHONPATH=. python benchmarks/swin_parity.py --model models/swin_t_random.onnx --images ../shared/images

Rebuilds the eager model the file was exported from (timm, random weights, the seed in the
file's metadata; its parameter hash must match the file's), runs the photos through both, and
prints the largest relative errors of logits, window attentions and gradients, and the largest
mask differences: the Explainer's masks against the dense oracle (:mod:`tests.helpers.swin_reference`,
every ``M``, ``P`` and ``a`` a full matrix) on the graph's own tensors for every method, fusion and
discard 0 / 0.5 / 0.9, and on eager timm's tensors at discard 0.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from tests.helpers.swin_reference import dense_swin_rows, eager_maps, scaled
from vit_explain.eager import weights_sha256
from vit_explain.families import ModelSpec, build_model
from vit_explain.runtime import Explainer
from vit_explain.runtime.images import load_image

CASES = [(m, f, d) for m in ("rollout", "grad_rollout") for f in ("mean", "min", "max") for d in (0.0, 0.5, 0.9)]
CASES += [("gae", None, None), ("attention", "mean", None)]


def _relative(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--count", type=int, default=2, help="photos (batch size)")
    args = parser.parse_args()
    explainer = Explainer(args.model, device="cpu")
    meta = explainer.metadata
    seed = int(re.fullmatch(r"random\(seed=(\d+)\)", meta.weights).group(1))
    model = build_model(ModelSpec(meta.source_model, weights="random", seed=seed))
    assert weights_sha256(model) == meta.weights_sha256, "not the model this file was exported from"
    photos = [load_image(path) for path in sorted(args.images.iterdir())[: args.count]]
    pixels = explainer.preprocess(photos)
    classes = [int(i) for i in np.random.default_rng(0).choice(meta.num_outputs, len(photos), replace=False)]
    weights = torch.zeros(len(photos), meta.num_outputs)
    weights[torch.arange(len(photos)), torch.tensor(classes)] = 1.0
    logits, attentions, gradients = eager_maps(model, torch.from_numpy(pixels), weights)
    graph = explainer.session.run_layers(pixels, weights.numpy())
    print(f"{meta.source_model} ({meta.weights}), {len(photos)} photos, classes {classes}")
    print(f"logits {_relative(graph.logits, logits):.1e}, "
          f"attentions {max(_relative(o, e) for o, e in zip(graph.attentions, attentions, strict=True)):.1e}, "
          f"gradients {max(_relative(o, e) for o, e in zip(graph.gradients, gradients, strict=True)):.1e}")
    worst_graph = worst_eager = 0.0
    for method, fusion, discard in CASES:
        started = time.perf_counter()
        masks = explainer.explain(pixels, method, fusion, discard, classes if method in ("grad_rollout", "gae") else None).masks
        took = time.perf_counter() - started
        rows = dense_swin_rows(model, graph.attentions, graph.gradients, method, fusion or "mean", discard or 0.0)
        error = float(np.abs(masks - scaled(rows).reshape(masks.shape)).max())
        worst_graph = max(worst_graph, error)
        line = f"{method:12} {fusion!s:5} {discard!s:4}  explain {took * 1000:6.0f} ms  mask vs dense (graph tensors) {error:.1e}"
        if not discard:
            eager = dense_swin_rows(model, attentions, gradients, method, fusion or "mean", 0.0)
            error = float(np.abs(masks - scaled(eager).reshape(masks.shape)).max())
            worst_eager = max(worst_eager, error)
            line += f", (eager tensors) {error:.1e}"
        print(line)
    print(f"largest mask difference: {worst_graph:.1e} (graph tensors), {worst_eager:.1e} (eager tensors, discard 0)")


if __name__ == "__main__":
    main()
