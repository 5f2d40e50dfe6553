"""One dynamic-batching queue per replica: asyncio on the request side, one thread on the model side.

Requests wait in a bounded queue (`QueueFull` past `max_queue` waiting requests -> 429). A worker task takes up to
`max_batch_size` of them (waiting `batch_wait_s` after the first for more to arrive), orders them so requests with
the same image sit side by side (one shared prefill), and runs `Engine.run_batch` on a single model thread; events
come back to each request's own asyncio queue. Requests that arrive while a batch decodes wait for the next batch:
`stream_generate` takes its rows up front, so joining a running decode would need a second prefill path.
A request whose client goes away is cancelled: dropped from the queue, or stopped at the next decode step.

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
from dataclasses import dataclass, field
from typing import Any

from otterhd_ray.serve.engine import Delta, Event, Failed, Finished, group_by_image
from otterhd_ray.serve.metrics import NullMetrics, ServeMetrics

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
    cancelled: bool = False
    _batch_cancel: MutableSet[int] | None = None
    _row: int = -1
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


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 32,
        max_queue: int = 128,
        batch_wait_s: float = 0.01,
        image_key: Callable[[Any], str] = lambda item: getattr(item, "image_digest", ""),
        metrics: ServeMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, batch_wait_s >= 0; got {max_batch_size}, "
                             f"{max_queue}, {batch_wait_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._image_key = image_key
        self.metrics = metrics or NullMetrics()
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

    def submit(self, item: Any) -> Ticket:
        """Queue a prepared request (call on the event loop). `QueueFull` when `max_queue` requests wait."""
        self._waiting = deque(t for t in self._waiting if not t.cancelled)
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(max(1, math.ceil(self._last_batch_s)))
        ticket = Ticket(item)
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
        batch: list[Ticket] = []
        while self._waiting and len(batch) < self.max_batch_size:
            ticket = self._waiting.popleft()
            if not ticket.cancelled:
                batch.append(ticket)
        self.metrics.queue_depth(len(self._waiting))
        return group_by_image(batch, lambda t: self._image_key(t.item))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            cancel_set: set[int] = set()
            for row, ticket in enumerate(batch):
                ticket._row, ticket._batch_cancel = row, cancel_set
                if ticket.cancelled:  # cancelled between being taken and now
                    cancel_set.add(row)
            start = time.perf_counter()
            self.running = len(batch)
            self.metrics.batch_size(len(batch))
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
        """Model thread: run the batch and hand each event to its request's queue on the event loop."""
        for events in self._run_batch([t.item for t in batch], cancel_set):
            now = time.perf_counter()
            for row, event in events:
                ticket = batch[row]
                if isinstance(event, Delta) and ticket._first_token is None:
                    ticket._first_token = now
                    self.metrics.time_to_first_token(now - ticket.submitted)
                if isinstance(event, Finished):
                    self.metrics.tokens(event.completion_tokens, now - ticket.submitted)
                loop.call_soon_threadsafe(ticket.events.put_nowait, event)
