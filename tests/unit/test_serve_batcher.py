"""The batching queue without a model or Serve: a fake `run_batch` records the batches it is given."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

import pytest

from otterhd_ray.serve.batcher import Batcher, QueueFull, Ticket
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


def test_a_ready_batch_waits_for_a_request_still_being_prepared():
    engine = FakeEngine()

    async def go():
        batcher = Batcher(engine, max_batch_size=8, batch_wait_s=0.0, arrival_wait_s=30.0)
        first = batcher.submit(Item("a"))
        with batcher.arriving():  # "b" is still decoding its image
            await asyncio.sleep(0.3)
            held = list(engine.batches)
            second = batcher.submit(Item("b"))
        results = await asyncio.gather(_text(first), _text(second))
        stats = batcher.stats.snapshot()
        newer = batcher.stats.snapshot(after=stats["last"])
        await batcher.close()
        return held, results, stats, newer

    held, results, stats, newer = asyncio.run(go())
    assert held == []  # "a" was not started alone
    assert engine.batches == [["a", "b"]]
    assert [r[0] for r in results] == ["a0 a1 a2 ", "b0 b1 b2 "]
    assert stats["summary"]["requests"] == 2 and stats["summary"]["batch_sizes"] == [2]
    for r in stats["requests"]:
        assert r["batch_size"] == 2 and r["completion_tokens"] == 3
        assert 0 <= r["prepared_s"] <= r["started_s"] <= r["first_token_s"] <= r["finished_s"]
    a = next(r for r in stats["requests"] if r["prepared_s"] == 0.0)
    assert a["started_s"] >= 0.3  # "a" waited for "b"
    assert newer["requests"] == [] and newer["summary"]["batches"] == 0


def test_the_wait_for_arrivals_is_bounded_and_a_failed_preparation_releases_it():
    engine = FakeEngine()

    async def go():
        batcher = Batcher(engine, max_batch_size=8, batch_wait_s=0.0, arrival_wait_s=0.2)
        with batcher.arriving():  # never submits within the bound
            first = batcher.submit(Item("a"))
            await asyncio.wait_for(_text(first), 10)
        ran_alone = list(engine.batches)
        batcher.arrival_wait_s = 30.0
        second = batcher.submit(Item("b"))
        start = asyncio.get_running_loop().time()
        with contextlib.suppress(ValueError), batcher.arriving():
            await asyncio.sleep(0.05)
            raise ValueError("bad image")  # a 400 before submit: "b" must not wait out the bound
        await _text(second)
        waited = asyncio.get_running_loop().time() - start
        await batcher.close()
        return ran_alone, waited

    ran_alone, waited = asyncio.run(go())
    assert ran_alone == [["a"]] and engine.batches == [["a"], ["b"]]
    assert waited < 10  # released by the failed arrival, not by the 30 s bound (loose for a loaded machine)


def test_chunks_group_the_events_already_queued():
    async def go():
        ticket = Ticket(Item("a"))
        for event in (Delta("x"), Delta("y"), Finished("stop", 1, 2)):
            ticket.events.put_nowait(event)
        return [group async for group in ticket.chunks()]

    groups = asyncio.run(go())
    assert len(groups) == 1 and [type(e).__name__ for e in groups[0]] == ["Delta", "Delta", "Finished"]
