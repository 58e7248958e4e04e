"""How a batch is cut and where its pieces run: chunks, parts side by side, the thread pool.

Why apart from the Explainer: the cutting rules are measured choices (see :data:`PART_IMAGES`
and :meth:`Scheduler.parts`) that hold for any method, and the pool's lifetime (``close``) is
what makes Ctrl-C safe; the Explainer only says what one piece's work is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

__all__ = ["PART_IMAGES", "Scheduler", "chunks"]

T = TypeVar("T")

#: The most images in one part of a split batch. Two parts side by side of 2 images each ran a
#: gradient batch 1-5% faster than of 4 (DeiT-tiny, 2 cores: 8 images 318 vs 336 ms median, 32
#: images 1095 vs 1126 ms), forward-only equal: the parts' working sets (the saved activations, the
#: output maps) then fit the shared cache better, and a pool of more parts than threads evens out
#: the threads' finishing times. One image per part was slower.
PART_IMAGES = 2


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


class Scheduler:
    """Runs a batch's pieces: parts side by side on a pool (CPU, at least one image per thread),
    else chunks of at most ``graph_batch`` images in turn, each over every thread."""

    def __init__(self, workers: int, graph_batch: int, uses_cuda: bool) -> None:
        if graph_batch < 1:
            raise ValueError(f"graph_batch must be at least 1, not {graph_batch}")
        self.workers = workers
        self.graph_batch = graph_batch
        self.uses_cuda = uses_cuda
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vit-explain") if workers > 1 else None
        self.closed = False

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads: queued work is cancelled, running work is waited for.

        Why: a worker still inside an onnxruntime call when the interpreter exits (after Ctrl-C,
        say) can meet onnxruntime's threads being torn down and abort the process (``terminate
        called without an active exception``, exit 134). Idempotent."""
        self.closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the pool ---------------------------------------------------------------------------
    @property
    def pool_map(self) -> Callable[[Callable, Iterable], Iterable] | None:
        """The pool's ``map``, or None with a single worker."""
        return None if self._pool is None else self._pool.map

    def map(self, function: Callable[..., T], items: Iterable) -> list[T]:
        """``function`` over ``items`` on the pool (in order), or on this thread without one."""
        if self._pool is None:
            return [function(item) for item in items]
        return list(self._pool.map(function, items))

    # -- how a batch is cut -----------------------------------------------------------------
    def splits(self, batch: int) -> bool:
        """Whether ``batch`` images run as parts side by side, each on one core: on a CPU with
        two threads or more, when there is at least one image per thread (with fewer, parts
        would leave cores idle that one call over every thread uses)."""
        return self._pool is not None and not self.uses_cuda and batch >= self.workers

    def parts(self, batch: int) -> list[slice]:
        """Consecutive parts of about ``batch / workers`` images, but no more than
        :data:`PART_IMAGES`, nor ``graph_batch / workers``; the first part holds half as many.

        Why the short first part: the threads would otherwise start together on equal parts and
        stay in step, decoding at the same moments and doing the maths at the same moments. Those
        stages are many short numpy and Pillow calls that hand Python's GIL back and forth, so
        in step they wait on each other (the maths of a part took 3.5-4.3 ms an image side by
        side against 2.1 ms alone). Half a part of offset puts one thread's decoding and maths
        inside the other's graph call, which holds no GIL: 8 images, rollout, 2 threads, 30
        interleaved calls: 125.7 vs 131.6 ms median; 32 images 529 vs 560 ms; gradient rollout
        8 images 290 vs 295 ms. The pool still ends balanced: the last part takes the rest."""
        size = max(1, min(PART_IMAGES, self.graph_batch // self.workers, math.ceil(batch / self.workers)))
        first = size // 2 if batch > size else 0
        rest = [slice(part.start + first, part.stop + first) for part in chunks(batch - first, size)]
        return ([slice(0, first)] if first else []) + rest

    def describe(self, batch: int) -> str:
        """How ``batch`` images are run, in words (for benchmark notes and logs)."""
        if self.splits(batch):
            parts = self.parts(batch)
            sizes = sorted({p.stop - p.start for p in parts}, reverse=True)
            return (
                f"{len(parts)} parts of {'/'.join(map(str, sizes))} images, side by side on "
                f"{self.workers} threads, one graph call per part on one thread each"
            )
        return f"{len(chunks(batch, self.graph_batch))} graph call(s) of at most {self.graph_batch} images, each on every thread"

    def run(self, batch: int, piece: Callable[[slice, bool], T]) -> list[T]:
        """``piece(images, single_thread)`` over the batch: parts side by side (single-threaded
        each) when :meth:`splits`, else chunks in turn (each over every thread). In order."""
        if self.splits(batch):
            return list(self._pool.map(lambda part: piece(part, True), self.parts(batch)))
        return [piece(chunk, False) for chunk in chunks(batch, self.graph_batch)]

    def spread(self, batch: int, work: Callable[[slice], np.ndarray], single_thread: bool) -> np.ndarray:
        """``work`` over slices of one chunk's images, concatenated: the maths of each image is
        independent and numpy releases the GIL in it, so a chunk run over every thread splits it
        over the pool too. A part (``single_thread``) or a lone image runs here."""
        if single_thread or batch < 2 or self._pool is None:
            return work(slice(None))
        bounds = np.linspace(0, batch, min(self.workers, batch) + 1).astype(int)
        return np.concatenate(list(self._pool.map(work, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])))
