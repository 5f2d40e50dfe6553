"""One dynamic-batching queue per replica: asyncio on the request side, one thread on the model side.

Requests wait in a bounded queue (`QueueFull` past `max_queue` waiting requests -> 429). A worker task takes up to
`max_batch_size` of them (waiting `batch_wait_s` after the first for more to arrive), orders them so requests with
the same image sit side by side (one shared prefill), and runs `Engine.run_batch` on a single model thread; events
come back to each request's own asyncio queue. Requests that arrive while a batch decodes wait for the next batch:
`stream_generate` takes its rows up front, so joining a running decode would need a second prefill path.
A request whose client goes away is cancelled: dropped from the queue, or stopped at the next decode step.

Requests still being prepared (`with batcher.arriving():` around body read and image decode) hold a ready batch
back for up to `arrival_wait_s`: when 32 clients send at once, their images finish decoding over a few hundred ms;
starting a batch with the first one made the others wait a whole batch (measured on an H200: batches of 31 + 1,
7 + 1, the single one costing a full prefill + decode each cycle).

Runs under pytest with no Serve (tests/unit/test_serve_batcher.py); Serve only hosts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, MutableSet, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from otterhd_ray.serve.engine import Event, Failed, Finished, group_by_image
from otterhd_ray.serve.metrics import NullMetrics, RecentStats, ServeMetrics

RunBatch = Callable[[Sequence[Any], MutableSet[int]], Iterator[list[tuple[int, Event]]]]


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Ticket:
    """One request's place in the batcher: iterate it for events; `cancel()` when the client is gone."""

    item: Any
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    arrived: float | None = None  # when the request reached the server (default: `submitted`)
    cancelled: bool = False
    _batch_cancel: MutableSet[int] | None = None
    _row: int = -1
    _batch_size: int = 0
    _started: float | None = None
    _first_token: float | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._batch_cancel is not None:
            self._batch_cancel.add(self._row)  # the model thread checks this set before every step

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def chunks(self) -> AsyncIterator[list[Event]]:
        """Events in groups: everything queued by the time the consumer is ready (one write per group when
        streaming, so a slow consumer catches up in one write instead of one per token)."""
        while True:
            group = [await self.events.get()]
            while not self.events.empty():
                group.append(self.events.get_nowait())
            yield group
            if any(isinstance(event, (Finished, Failed)) for event in group):
                return


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 32,
        max_queue: int = 128,
        batch_wait_s: float = 0.01,
        arrival_wait_s: float = 1.0,
        image_key: Callable[[Any], str] = lambda item: getattr(item, "image_digest", ""),
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait_s < 0 or arrival_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, batch_wait_s >= 0, arrival_wait_s >= 0; got "
                             f"{max_batch_size}, {max_queue}, {batch_wait_s}, {arrival_wait_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.arrival_wait_s = arrival_wait_s
        self._image_key = image_key
        self.metrics = metrics or NullMetrics()
        self.stats = RecentStats()
        self._arriving = 0
        self._waiting: deque[Ticket] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otterhd-model")
        self._last_batch_s = 1.0
        self.num_batches = 0
        self.running = 0

    # ----------------------------------------------------------------------------------------- requests
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's preparation (body, image, prompt) up to `submit`: a ready batch waits for it (at most
        `arrival_wait_s`) instead of leaving it for the next batch. Call on the event loop."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    def submit(self, item: Any, arrived: float | None = None) -> Ticket:
        """Queue a prepared request (call on the event loop). `QueueFull` when `max_queue` requests wait.
        `arrived`: its `time.perf_counter()` at arrival, for the timings in `stats` (default: now)."""
        self._waiting = deque(t for t in self._waiting if not t.cancelled)
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(max(1, math.ceil(self._last_batch_s)))
        ticket = Ticket(item)
        ticket.arrived = ticket.submitted if arrived is None else arrived
        self._waiting.append(ticket)
        self.metrics.queue_depth(len(self._waiting))
        self._ensure_worker()
        self._wakeup.set()
        return ticket

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="otterhd-batcher")

    def healthy(self) -> bool:
        return self._worker is None or not self._worker.done()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------- worker
    async def _next_batch(self) -> list[Ticket]:
        while not any(not t.cancelled for t in self._waiting):
            self._waiting.clear()
            self._wakeup.clear()
            await self._wakeup.wait()
        if self.batch_wait_s and len(self._waiting) < self.max_batch_size:
            await asyncio.sleep(self.batch_wait_s)  # let a burst of concurrent requests land in one batch
        await self._wait_for_arrivals()
        batch: list[Ticket] = []
        while self._waiting and len(batch) < self.max_batch_size:
            ticket = self._waiting.popleft()
            if not ticket.cancelled:
                batch.append(ticket)
        self.metrics.queue_depth(len(self._waiting))
        return group_by_image(batch, lambda t: self._image_key(t.item))

    async def _wait_for_arrivals(self) -> None:
        """While requests are still being prepared and the batch has room, wait for them (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.arrival_wait_s
        while self._arriving and sum(not t.cancelled for t in self._waiting) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            cancel_set: set[int] = set()
            start = time.perf_counter()
            for row, ticket in enumerate(batch):
                ticket._row, ticket._batch_cancel = row, cancel_set
                ticket._started, ticket._batch_size = start, len(batch)
                if ticket.cancelled:  # cancelled between being taken and now
                    cancel_set.add(row)
            self.running = len(batch)
            self.metrics.batch_size(len(batch))
            self.stats.batch(len(batch))
            try:
                await loop.run_in_executor(self._thread, self._decode, batch, cancel_set, loop)
            except Exception as err:  # a failing batch fails its requests, never the replica
                message = f"generation failed: {type(err).__name__}: {err}"[:500]
                for ticket in batch:
                    ticket.events.put_nowait(Failed(message))
            finally:
                self.running = 0
                self._last_batch_s = time.perf_counter() - start
                self.num_batches += 1

    def _decode(self, batch: list[Ticket], cancel_set: set[int], loop: asyncio.AbstractEventLoop) -> None:
        """Model thread: run the batch and hand each step's events to the event loop in one call (one wake-up of
        the loop per step, not per token). The first yield comes right after prefill: every row's first token."""
        for events in self._run_batch([t.item for t in batch], cancel_set):
            now = time.perf_counter()
            for ticket in batch:
                if ticket._first_token is None:
                    ticket._first_token = now
                    self.metrics.time_to_first_token(now - ticket.arrived)
            for row, event in events:
                if isinstance(event, Finished):
                    self._finished(batch[row], event, now)
            if events:
                loop.call_soon_threadsafe(_deliver, [(batch[row], event) for row, event in events])

    def _finished(self, ticket: Ticket, event: Finished, now: float) -> None:
        self.metrics.tokens(event.completion_tokens, now - ticket.submitted)
        if event.reason == "cancelled":
            return
        arrived = ticket.arrived
        self.stats.request(prepared_s=ticket.submitted - arrived, started_s=ticket._started - arrived,
                           first_token_s=ticket._first_token - arrived, finished_s=now - arrived,
                           batch_size=ticket._batch_size, completion_tokens=event.completion_tokens)


def _deliver(pairs: list[tuple[Ticket, Event]]) -> None:
    for ticket, event in pairs:
        ticket.events.put_nowait(event)
