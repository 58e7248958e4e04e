"""The micro-batcher and the request rules on their own, without a model or a server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vit_explain.serve.batcher import MicroBatcher
from vit_explain.serve.protocol import RequestError, parse_instances


def _record(calls: list, delay: float = 0.0):
    """A batch runner that records (key, payloads, thread) and answers each payload doubled."""

    def run(key, payloads):
        calls.append((key, list(payloads), threading.current_thread().name))
        time.sleep(delay)
        return [2 * p for p in payloads]

    return run


def test_items_of_one_key_share_a_call_up_to_max_batch_in_arrival_order():
    calls: list = []

    async def main():
        batcher = MicroBatcher(_record(calls), max_batch=3, max_delay_s=0.2)
        futures = batcher.submit("a", [1, 2]) + batcher.submit("b", [10]) + batcher.submit("a", [3, 4])
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results

    assert asyncio.run(main()) == [2, 4, 20, 6, 8]
    assert [(key, payloads) for key, payloads, _ in calls] == [("a", [1, 2, 3]), ("b", [10]), ("a", [4])]
    assert all(thread != threading.main_thread().name for *_, thread in calls)  # never on the loop's thread


def test_a_batch_waits_at_most_max_delay_and_the_loop_stays_free():
    calls: list = []

    async def main():
        batcher = MicroBatcher(_record(calls, delay=0.3), max_batch=8, max_delay_s=0.05)
        started = time.monotonic()
        future = batcher.submit("k", [1])[0]
        ticks = 0
        while not future.done():  # the loop keeps running while the call sleeps on its thread
            ticks += 1
            await asyncio.sleep(0.01)
        await batcher.close()
        return time.monotonic() - started, ticks, future.result()

    elapsed, ticks, result = asyncio.run(main())
    assert result == 2 and 0.3 <= elapsed < 2.0 and ticks >= 10


def test_a_cancelled_item_leaves_the_queue_and_an_error_reaches_its_batch_only():
    calls: list = []

    def run(key, payloads):
        calls.append(list(payloads))
        if key == "bad":
            raise RuntimeError("boom")
        return payloads

    async def main():
        batcher = MicroBatcher(run, max_batch=4, max_delay_s=0.1)
        gone, kept = batcher.submit("k", [1, 2])
        gone.cancel()
        bad = batcher.submit("bad", [3])[0]
        good = await kept
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        await batcher.close()
        return good

    assert asyncio.run(main()) == 2
    assert calls == [[2], [3]]


def _image():
    return {"image_bytes": {"b64": "AAAA"}}


def test_parameters_default_every_instance_and_instances_override():
    parsed = parse_instances(
        {"instances": [_image(), {**_image(), "method": "gae"}], "parameters": {"method": "rollout", "overlay": True}}, 8
    )
    assert [p.settings for p in parsed] == [{"method": "rollout"}, {"method": "gae"}]
    assert [p.index for p in parsed] == [0, 1] and all(p.overlay for p in parsed)


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        ({"instances": [_image()], "extra": 1}, 400, "unknown field 'extra'"),
        ({"instances": [_image(), {**_image(), "categry_index": 3}]}, 400, "instance 1: unknown field 'categry_index'"),
        ({"instances": [_image()], "parameters": {"top_k": -1}}, 400, "top_k"),
        ({"instances": [_image()] * 3}, 413, "3 instances"),
        ({"instances": "x"}, 400, "non-empty list"),
    ],
)
def test_bad_shapes_are_refused_by_name(payload, status, words):
    with pytest.raises(RequestError, match=words) as caught:
        parse_instances(payload, 2)
    assert caught.value.status == status


def test_predict_takes_no_explanation_settings():
    with pytest.raises(RequestError, match="instance 0: unknown field 'method'"):
        parse_instances({"instances": [{**_image(), "method": "rollout"}]}, 4, with_settings=False)
