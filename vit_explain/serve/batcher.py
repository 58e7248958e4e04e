"""Dynamic micro-batching: instances from concurrent requests with the same key share one call.

Why the server batches itself: KServe's batcher sidecar batches ``:predict`` only, and an
explanation's graph call costs about the same for 1 image as for 2 on one core, so requests
that arrive together should share it. One dispatcher task per model gathers the queued items
whose key (the settings) matches the oldest one's, up to ``max_batch``, waiting at most
``max_delay`` after that oldest item arrived, and runs the call on its own thread, so the event
loop never waits for the graph or the maths. One call runs at a time per model (it uses every
core already); while it runs, the next batch fills. Items of other keys keep their order and
go next. An item whose caller gave up (a timeout) is dropped from the queue before its call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MicroBatcher"]

#: ``run(key, payloads) -> results``, one result per payload, in order; runs on the batcher's thread.
BatchRunner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers items into batches of one key and runs them, one batch at a time, off the loop.

    ``on_batch(size)`` is called for each batch run (metrics). Create it inside the running loop."""

    def __init__(self, run: BatchRunner, max_batch: int, max_delay_s: float, name: str = "model",
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._run, self.max_batch, self.max_delay_s = run, max_batch, max(0.0, max_delay_s)
        self._on_batch = on_batch or (lambda size: None)
        self._queue: list[_Item] = []
        self._arrived = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"vit-explain-serve-{name}")
        self._task = asyncio.get_running_loop().create_task(self._dispatch())
        self._closing = False

    @property
    def queued(self) -> int:
        """Items waiting for a call (not those in the call now running, nor those given up)."""
        return sum(1 for item in self._queue if not item.future.done())

    def submit(self, key: Hashable, payloads: Sequence[Any]) -> list[asyncio.Future]:
        """Queue ``payloads`` under ``key``; each future gets its result (or the call's exception)."""
        if self._closing:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        items = [_Item(key, payload, loop.create_future()) for payload in payloads]
        self._queue.extend(items)
        self._arrived.set()
        return [item.future for item in items]

    async def close(self) -> None:
        """Run what is queued, then stop (the server's shutdown, after in-flight requests are
        answered: normally nothing is left)."""
        self._closing = True
        while any(not item.future.done() for item in self._queue):
            self._arrived.set()
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._thread.shutdown(wait=True)

    # -- the dispatcher ------------------------------------------------------------------
    def _take(self) -> list[_Item]:
        """Up to ``max_batch`` live items of the oldest live item's key, removed from the queue."""
        self._queue = [item for item in self._queue if not item.future.done()]
        if not self._queue:
            return []
        key = self._queue[0].key
        batch = [item for item in self._queue if item.key == key][: self.max_batch]
        taken = {id(item) for item in batch}
        self._queue = [item for item in self._queue if id(item) not in taken]
        return batch

    def _ready(self) -> bool:
        """A full batch is queued for the oldest key, or the oldest item has waited long enough."""
        live = [item for item in self._queue if not item.future.done()]
        if not live:
            return False
        same = sum(1 for item in live if item.key == live[0].key)
        return same >= self.max_batch or time.monotonic() - live[0].arrived >= self.max_delay_s

    async def _wait_until_ready(self) -> None:
        while not self._ready():
            live = [item for item in self._queue if not item.future.done()]
            self._arrived.clear()
            timeout = None if not live else max(0.0, live[0].arrived + self.max_delay_s - time.monotonic())
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                pass

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_until_ready()
            batch = self._take()
            if not batch:
                continue
            self._on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._thread, self._run, batch[0].key, [i.payload for i in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
