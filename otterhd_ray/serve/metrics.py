"""Serving metrics: Prometheus through `ray.util.metrics` inside Ray, nothing outside it.

Exported names (Ray prefixes `ray_`, counters get `_total`, histograms `_bucket`/`_sum`/`_count`):
`ray_otterhd_serve_requests_total{code}`, `ray_otterhd_serve_errors_total{code}`, `ray_otterhd_serve_queue_depth`,
`ray_otterhd_serve_batch_size_*`, `ray_otterhd_serve_ttft_s_*` (request arrival to the first generated token:
body read, image decode, queueing and prefill included; text held back by the stream decoder is not waited for),
`ray_otterhd_serve_tokens_total` (tokens/s = its rate). cluster/grafana's serving row plots them;
tests/unit/test_grafana.py checks the names.

`RecentStats` keeps the last requests' timings and batch sizes in memory for `GET /stats` (benchmarks read it to
report server-side time to first token and how full the batches were).
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

TTFT_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics(Protocol):
    def request(self, code: int) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def batch_size(self, size: int) -> None: ...
    def time_to_first_token(self, seconds: float) -> None: ...
    def tokens(self, count: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class RequestTiming:
    """Server-side seconds of one finished request, all from its arrival (handler entry)."""

    n: int  # sequence number: a reader keeps the last one it saw and asks only for newer records
    prepared_s: float  # arrival -> queued: body read, JSON, image decode/resize/patchify, prompt build
    started_s: float  # arrival -> its batch started (prepared_s + waiting for the batch)
    first_token_s: float  # arrival -> the first generated token reached the host
    finished_s: float  # arrival -> the last token
    batch_size: int
    completion_tokens: int


class RecentStats:
    """The last `keep` request timings and batch sizes (bounded, in memory), for `GET /stats`."""

    def __init__(self, keep: int = 4096) -> None:
        self._requests: deque[RequestTiming] = deque(maxlen=keep)
        self._batches: deque[tuple[int, int]] = deque(maxlen=keep)  # (n, size)
        self._counter = itertools.count(1)

    def batch(self, size: int) -> None:
        self._batches.append((next(self._counter), size))

    def request(self, **timing: Any) -> None:
        self._requests.append(RequestTiming(n=next(self._counter), **timing))

    def snapshot(self, after: int = 0) -> dict[str, Any]:
        """Records numbered above `after`, with p50/p95 of each timing and the mean batch size."""
        requests = [r for r in self._requests if r.n > after]
        sizes = [size for n, size in self._batches if n > after]
        summary: dict[str, Any] = {"requests": len(requests), "batches": len(sizes),
                                   "mean_batch_size": statistics.fmean(sizes) if sizes else None,
                                   "batch_sizes": sizes}
        for key in ("prepared_s", "started_s", "first_token_s", "finished_s"):
            values = sorted(getattr(r, key) for r in requests)
            summary[key] = {"p50": _quantile(values, 0.5), "p95": _quantile(values, 0.95)} if values else None
        last = max((r.n for r in requests), default=after)
        return {"last": max(last, max((n for n, _ in self._batches if n > after), default=after)),
                "summary": summary, "requests": [asdict(r) for r in requests]}


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class NullMetrics:
    """Outside Ray (the chat command, unit tests): record nothing."""

    def request(self, code: int) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_size(self, size: int) -> None:
        pass

    def time_to_first_token(self, seconds: float) -> None:
        pass

    def tokens(self, count: int, seconds: float) -> None:
        pass


class RayMetrics:
    """`ray.util.metrics` instruments; create inside a Ray worker (the Serve replica)."""

    def __init__(self, model: str) -> None:
        from ray.util import metrics

        tags = {"model": model}
        self._requests = metrics.Counter("otterhd_serve_requests", "HTTP requests answered, by status code",
                                         tag_keys=("model", "code"))
        self._errors = metrics.Counter("otterhd_serve_errors", "requests answered with an error, by status code",
                                       tag_keys=("model", "code"))
        self._queue = metrics.Gauge("otterhd_serve_queue_depth", "requests waiting for a batch", tag_keys=("model",))
        self._batch = metrics.Histogram("otterhd_serve_batch_size", "requests per decode batch",
                                        boundaries=BATCH_BOUNDARIES, tag_keys=("model",))
        self._ttft = metrics.Histogram("otterhd_serve_ttft_s", "seconds from queueing to the first text",
                                       boundaries=TTFT_BOUNDARIES_S, tag_keys=("model",))
        self._tokens = metrics.Counter("otterhd_serve_tokens", "tokens generated", tag_keys=("model",))
        for instrument in (self._requests, self._errors, self._queue, self._batch, self._ttft, self._tokens):
            instrument.set_default_tags(tags)

    def request(self, code: int) -> None:
        self._requests.inc(1, {"code": str(code)})
        if code >= 400:
            self._errors.inc(1, {"code": str(code)})

    def queue_depth(self, depth: int) -> None:
        self._queue.set(depth)

    def batch_size(self, size: int) -> None:
        self._batch.observe(size)

    def time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def tokens(self, count: int, seconds: float) -> None:
        if count:
            self._tokens.inc(count)
