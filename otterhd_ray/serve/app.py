"""The OpenAI-compatible HTTP layer: a FastAPI app around a `ChatService` (engine + batcher + limits).

`create_app(service)` is the whole HTTP surface; Serve hosts it (otterhd_ray/serve/deployment.py) and tests drive
it in-process with no Serve. Every check runs before the request is queued: auth, body size, JSON, fields,
model name, image fetch and decode, prompt length; only then does the request reach the batcher.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /stats` (recent server-side timings and
batch sizes, `?after=N` for the records after N), `GET /` (the web page).

CPU work of a request (JSON of a multi-MB body, base64, image decode/resize/patchify) runs in worker threads, never
on the event loop, so 32 requests prepare in parallel and the loop keeps streaming tokens of the running batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from otterhd_ray.serve import protocol
from otterhd_ray.serve.batcher import Batcher, QueueFull, Ticket
from otterhd_ray.serve.engine import Delta, Engine, Failed, Finished
from otterhd_ray.serve.media import ImagePolicy, prepare_image, read_image_url
from otterhd_ray.serve.metrics import NullMetrics, ServeMetrics
from otterhd_ray.serve.page import PAGE
from otterhd_ray.serve.protocol import APIError, ChatRequest


@dataclass
class ChatService:
    """Everything a replica serves with; built once per replica (`deployment.build_service`)."""

    engine: Engine
    batcher: Batcher
    model_name: str
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    resolution: int = -1
    max_body_bytes: int = 32 * 2**20
    api_key: str | None = None
    metrics: ServeMetrics = field(default_factory=NullMetrics)
    started: int = field(default_factory=lambda: int(time.time()))

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: no timing hint about how much of a guessed key was right. The key is never logged.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    async def read_json(self, request: Request) -> Any:
        body = await self._read_body(request)
        try:
            # A body with an inline image is megabytes of JSON: parse it off the event loop.
            return json.loads(body) if len(body) < 65536 else await asyncio.to_thread(json.loads, body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})"[:200], None, "invalid_json") from None

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"request body is over the {self.max_body_bytes}-byte limit", None,
                           "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"request body is over the {self.max_body_bytes}-byte limit", None,
                               "request_too_large")
        return bytes(body)

    async def submit(self, req: ChatRequest, arrived: float | None = None) -> Ticket:
        """Image, prompt, queue: every refusal here comes before any model work. `arrived`: perf_counter() when
        the request came in (for the server-side timings)."""
        image = None
        if req.image_url is not None:
            image = await asyncio.to_thread(self._image, req.image_url)
        prepared = self.engine.prepare(req, image)
        try:
            return self.batcher.submit(prepared, arrived)
        except QueueFull as err:
            raise APIError(429, f"the server is at capacity ({self.batcher.max_queue} requests waiting); retry "
                           f"after {err.retry_after_s} s", None, "rate_limit_exceeded",
                           headers={"Retry-After": str(err.retry_after_s)}) from None

    def _image(self, url: str) -> Any:
        data = read_image_url(url, self.image_policy, "image_url")
        return prepare_image(data, self.image_policy, self.resolution)


async def _collect(service: ChatService, req: ChatRequest, ticket: Ticket) -> dict[str, Any]:
    parts: list[str] = []
    try:
        async for event in ticket:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise APIError(500, event.message, None, "generation_failed")
            elif isinstance(event, Finished):
                return protocol.completion(req, service.model_name, "".join(parts), event.reason,
                                           event.prompt_tokens, event.completion_tokens)
    finally:
        ticket.cancel()  # no-op once finished; stops the row when the client went away (task cancelled)
    raise APIError(500, "generation ended without a result", None, "generation_failed")


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(service: ChatService, req: ChatRequest, ticket: Ticket) -> AsyncIterator[str]:
    name = service.model_name
    try:
        yield _sse(protocol.chunk(req, name, {"role": "assistant", "content": ""}))
        async for events in ticket.chunks():  # one write per group of queued events (OpenAI's chunks, in order)
            out = []
            for event in events:
                if isinstance(event, Delta):
                    out.append(_sse(protocol.chunk(req, name, {"content": event.text})))
                elif isinstance(event, Failed):
                    out.append(_sse(APIError(500, event.message, None, "generation_failed").body()))
                elif isinstance(event, Finished):
                    out.append(_sse(protocol.chunk(req, name, {}, event.reason)))
                    if req.include_usage:
                        counts = protocol.usage(event.prompt_tokens, event.completion_tokens)
                        out.append(_sse(protocol.chunk(req, name, {}, usage_counts=counts, choices=False)))
            yield "".join(out)
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # the client went away mid-stream: free the row at the next decode step


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(service: ChatService) -> FastAPI:
    """The HTTP app of one replica."""
    app = FastAPI(title="otterhd", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def count_and_contain(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception as err:  # anything unexpected: a 500 in OpenAI's shape, the replica keeps serving
            response = _error_response(APIError(500, f"internal error: {type(err).__name__}", None, "internal"))
        service.metrics.request(response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(err.status_code, str(err.detail), None, None))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = service.batcher.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "queue_depth": service.batcher.queue_depth,
                             "running": service.batcher.running}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        service.check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": service.started, "owned_by": "otterhd"}]})

    @app.get("/stats")
    async def stats(request: Request, after: int = 0) -> JSONResponse:
        service.check_auth(request)
        return JSONResponse(service.batcher.stats.snapshot(after))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        service.check_auth(request)
        with service.batcher.arriving():  # a ready batch waits for this request (bounded), not the next batch
            req = protocol.parse_chat_request(await service.read_json(request))
            service.check_model(req.model)
            ticket = await service.submit(req, arrived)
        if req.stream:
            return StreamingResponse(_stream(service, req, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(service, req, ticket))

    return app
