"""Serving metrics: Prometheus through `ray.util.metrics` inside Ray, nothing outside it.

Exported names (Ray prefixes `ray_`, counters get `_total`, histograms `_bucket`/`_sum`/`_count`):
`ray_otterhd_serve_requests_total{code}`, `ray_otterhd_serve_errors_total{code}`, `ray_otterhd_serve_queue_depth`,
`ray_otterhd_serve_batch_size_*`, `ray_otterhd_serve_ttft_s_*` (submit to first streamed text; image decode and
tokenizing not included), `ray_otterhd_serve_tokens_total` (tokens/s = its rate). cluster/grafana's serving
row plots them; tests/unit/test_grafana.py checks the names.
"""

from __future__ import annotations

from typing import Protocol

TTFT_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics(Protocol):
    def request(self, code: int) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def batch_size(self, size: int) -> None: ...
    def time_to_first_token(self, seconds: float) -> None: ...
    def tokens(self, count: int, seconds: float) -> None: ...


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
