"""The batching queue without a model or Serve: a fake `run_batch` records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from otterhd_ray.serve.batcher import Batcher, QueueFull
from otterhd_ray.serve.engine import Delta, Failed, Finished


@dataclass
class Item:
    name: str
    image_digest: str = ""
    steps: int = 3


class FakeEngine:
    """Emits one Delta per step per row (its name + step), then Finished; honours the cancel set per step."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.batches: list[list[str]] = []
        self.gate = gate
        self.fail = fail
        self.cancelled_seen: list[set[int]] = []

    def __call__(self, items, cancelled):
        self.batches.append([it.name for it in items])
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        done = set()
        for step in range(max(it.steps for it in items)):
            events = []
            for i, it in enumerate(items):
                if i in cancelled or i in done:
                    continue
                if step < it.steps:
                    events.append((i, Delta(f"{it.name}{step} ")))
                if step == it.steps - 1:
                    events.append((i, Finished("length", 1, it.steps)))
                    done.add(i)
            if events:
                yield events
        self.cancelled_seen.append(set(cancelled))
        yield [(i, Finished("cancelled", 1, 0)) for i in range(len(items)) if i not in done]


async def _text(ticket) -> tuple[str, object]:
    parts, last = [], None
    async for event in ticket:
        if isinstance(event, Delta):
            parts.append(event.text)
        last = event
    return "".join(parts), last


def test_concurrent_requests_share_one_batch_and_same_images_sit_together():
    engine = FakeEngine()

    async def go():
        batcher = Batcher(engine, max_batch_size=8, batch_wait_s=0.05)
        items = [Item("a", "img1"), Item("b", "img2"), Item("c", "img1"), Item("d", "img2", steps=1)]
        tickets = [batcher.submit(it) for it in items]
        results = await asyncio.gather(*(_text(t) for t in tickets))
        await batcher.close()
        return results

    results = asyncio.run(go())
    assert engine.batches == [["a", "c", "b", "d"]]  # one batch, grouped by image, order within a group kept
    assert [r[0] for r in results] == ["a0 a1 a2 ", "b0 b1 b2 ", "c0 c1 c2 ", "d0 "]
    assert all(isinstance(r[1], Finished) and r[1].reason == "length" for r in results)


def test_requests_arriving_during_a_batch_wait_for_the_next_and_batches_are_capped():
    gate = threading.Event()
    engine = FakeEngine(gate)

    async def go():
        batcher = Batcher(engine, max_batch_size=2, batch_wait_s=0.0)
        first = batcher.submit(Item("a"))
        while not engine.batches:  # the model thread has taken "a" and is held at the gate
            await asyncio.sleep(0.01)
        later = [batcher.submit(Item(n)) for n in "bcd"]
        assert batcher.queue_depth == 3
        gate.set()
        await asyncio.gather(*(_text(t) for t in [first, *later]))
        await batcher.close()

    asyncio.run(go())
    assert engine.batches == [["a"], ["b", "c"], ["d"]]


def test_full_queue_raises_queue_full_with_a_retry_hint():
    gate = threading.Event()
    engine = FakeEngine(gate)

    async def go():
        batcher = Batcher(engine, max_batch_size=1, max_queue=2, batch_wait_s=0.0)
        running = batcher.submit(Item("a"))
        while not engine.batches:
            await asyncio.sleep(0.01)
        waiting = [batcher.submit(Item("b")), batcher.submit(Item("c"))]
        with pytest.raises(QueueFull) as err:
            batcher.submit(Item("d"))
        assert err.value.retry_after_s >= 1
        waiting[0].cancel()  # a cancelled waiter frees its place
        replacement = batcher.submit(Item("e"))
        gate.set()
        results = await asyncio.gather(*(_text(t) for t in [running, waiting[1], replacement]))
        await batcher.close()
        return results

    results = asyncio.run(go())
    assert [r[0] for r in results] == ["a0 a1 a2 ", "c0 c1 c2 ", "e0 e1 e2 "]
    assert ["b"] not in engine.batches


def test_cancelling_a_running_request_stops_its_row_only():
    gate = threading.Event()
    engine = FakeEngine(gate)

    async def go():
        batcher = Batcher(engine, max_batch_size=4, batch_wait_s=0.05)
        keep, drop = batcher.submit(Item("k", steps=4)), batcher.submit(Item("x", steps=4))
        while not engine.batches:
            await asyncio.sleep(0.01)
        drop.cancel()
        gate.set()
        result = await _text(keep)
        dropped = await _text(drop)
        await batcher.close()
        return result, dropped

    (kept, kept_end), (dropped, dropped_end) = asyncio.run(go())
    assert kept == "k0 k1 k2 k3 " and kept_end.reason == "length"
    assert dropped == "" and dropped_end.reason == "cancelled"
    assert engine.cancelled_seen == [{1}]


def test_a_failing_batch_fails_its_requests_and_the_batcher_keeps_going():
    engine = FakeEngine(fail=True)

    async def go():
        batcher = Batcher(engine, max_batch_size=4, batch_wait_s=0.01)
        failed = await _text(batcher.submit(Item("a")))
        engine.fail = False
        ok = await _text(batcher.submit(Item("b")))
        healthy = batcher.healthy()
        await batcher.close()
        return failed, ok, healthy

    (text, event), ok, healthy = asyncio.run(go())
    assert isinstance(event, Failed) and "boom" in event.message
    assert ok[0] == "b0 b1 b2 " and healthy


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(FakeEngine(), max_queue=0)
