"""Batches pipelined (``runtime/prefetch.py``): chunk k+1 is loaded while chunk k is computed,
results come back in order, errors surface, and the Explainer's pipelined chunks give the masks
of the plain path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from vit_explain.runtime import Explainer
from vit_explain.runtime.prefetch import Prefetcher
from vit_explain.runtime.scheduler import chunks


def test_the_next_load_runs_during_the_current_compute():
    started = [threading.Event() for _ in range(4)]
    overlapped = []

    def load(piece: slice) -> int:
        started[piece.start].set()
        return piece.start * 10

    def compute(piece: slice, loaded: int) -> int:
        if piece.start + 1 < 4:  # the next load must start while this compute is still running
            overlapped.append(started[piece.start + 1].wait(timeout=5))
        return loaded + 1

    prefetcher = Prefetcher()
    try:
        assert prefetcher.run(chunks(4, 1), load, compute) == [1, 11, 21, 31]
        assert overlapped == [True, True, True]
        assert prefetcher.run([], load, compute) == []
    finally:
        prefetcher.close()


def test_an_error_in_a_load_or_compute_is_raised():
    prefetcher = Prefetcher()

    def load(piece: slice) -> int:
        if piece.start == 2:
            raise ValueError("bad image")
        return piece.start

    try:
        with pytest.raises(ValueError, match="bad image"):
            prefetcher.run(chunks(4, 1), load, lambda piece, loaded: loaded)
        with pytest.raises(KeyError):
            prefetcher.run(chunks(4, 1), lambda piece: piece.start, lambda piece, loaded: {}[loaded])
    finally:
        prefetcher.close()
    prefetcher.close()  # idempotent


def test_pipelined_chunks_give_the_plain_masks(export_family, tmp_path, monkeypatch):
    """The CUDA route (chunks in turn, not parts) on the CPU provider: 5 photos in chunks of 2."""
    path = export_family("deit").path
    rng = np.random.default_rng(0)
    photos = []
    for i in range(5):
        photo = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)).save(photo)
        photos.append(photo)
    with Explainer(path, device="cpu", threads=2, graph_batch=2, method_in_graph=True) as pipelined, \
            Explainer(path, device="cpu", threads=1) as plain:
        monkeypatch.setattr(pipelined.scheduler, "uses_cuda", True)  # chunks in turn, as on CUDA
        calls = []
        run = pipelined.prefetcher.run
        monkeypatch.setattr(pipelined.prefetcher, "run", lambda *a: calls.append(len(a[0])) or run(*a))
        got = pipelined.explain(photos, category_index=[1, 2, 3, 4, 5])
        want = plain.explain(photos, category_index=[1, 2, 3, 4, 5])
        assert calls == [3]
        assert got.category_index == want.category_index
        assert np.abs(got.masks - want.masks).max() <= 1e-5
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
