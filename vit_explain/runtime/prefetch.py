"""Batches pipelined: the images of chunk k+1 are decoded while chunk k is in the graph.

Why: on a GPU the graph call of a chunk of 64 images is a few tens of milliseconds, and decoding
and resizing 64 photos on the host is as long or longer; run one after the other, the device
waits for the host half of the time. Here a loader thread starts preparing the next chunk (which
spreads its images over the Explainer's pool: Pillow and numpy release the GIL) before the
current chunk's graph call starts, and onnxruntime releases the GIL during the call, so both run
at once. One chunk ahead is enough to hide the shorter of the two and bounds the memory to two
chunks of pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Prefetcher"]

L = TypeVar("L")
R = TypeVar("R")


class Prefetcher:
    """One loader thread that keeps one piece of work prepared ahead of the caller."""

    def __init__(self) -> None:
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="vit-explain-prefetch")
        self.closed = False

    def run(self, pieces: Sequence[slice], load: Callable[[slice], L], compute: Callable[[slice, L], R]) -> list[R]:
        """``compute(piece, load(piece))`` for each piece in order, ``load`` of the next piece
        running on the loader thread while ``compute`` of this one runs on the caller's. An error
        in either is raised here, after the load in flight (if any) has finished."""
        if not pieces:
            return []
        results: list[R] = []
        pending: Future = self._loader.submit(load, pieces[0])
        try:
            for index, piece in enumerate(pieces):
                loaded = pending.result()
                if index + 1 < len(pieces):
                    pending = self._loader.submit(load, pieces[index + 1])
                results.append(compute(piece, loaded))
        except BaseException:
            pending.cancel()
            raise
        return results

    def close(self) -> None:
        """Stop the loader thread (queued loads cancelled, a running one waited for). Idempotent."""
        self.closed = True
        self._loader.shutdown(wait=True, cancel_futures=True)
