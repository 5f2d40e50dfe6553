"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, behaviour scripted per request.

    with FakeOpenAI(answer=lambda body: "yes") as server:
        server.script(["429:0.05", "500", "stall:2", "malformed", "empty_choices"])  # then `answer` for the rest
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)

Actions (consumed one per POST /v1/chat/completions, in arrival order):
    ok             200 with `answer(body)` as the assistant message (also the default once the script is empty)
    ok:<text>      200 with <text>
    429[:s]        429 with `Retry-After: s` (default 0)
    500 / 503      that status with an OpenAI-style error body
    stall:<s>      sleep s seconds before answering (past the client's timeout the client gives up)
    malformed      200 with a body that is not JSON
    empty_choices  200 with valid JSON whose `choices` is empty
    401echo        401 whose error message echoes the request's Authorization header (a hostile server)
Every request is recorded (`server.requests`: parsed body, headers, action) for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
    }


class FakeOpenAI:
    def __init__(self, answer: Callable[[dict[str, Any]], str] | None = None):
        self.answer = answer or (lambda body: "yes")
        self._script: deque[str] = deque()
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control
    def script(self, actions: list[str]) -> None:
        with self._lock:
            self._script.extend(actions)

    def _next_action(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else "ok"

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def count(self, action_prefix: str) -> int:
        return sum(1 for r in self.requests if r["action"].split(":")[0] == action_prefix)

    # -- lifecycle
    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected for `stall`

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = {}
                action = fake._next_action()
                with fake._lock:
                    fake.requests.append(
                        {
                            "path": self.path,
                            "body": body,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "action": action,
                        }
                    )
                if not self.path.split("?", 1)[0].endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                name, _, arg = action.partition(":")
                model = body.get("model", "fake")
                if name == "stall":
                    time.sleep(float(arg or 5))
                    name, arg = "ok", ""
                if name == "ok":
                    text = arg if arg else fake.answer(body)
                    self._send(200, json.dumps(_completion(text, model)).encode())
                elif name == "429":
                    err = {
                        "error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}
                    }
                    self._send(429, json.dumps(err).encode(), {"Retry-After": arg or "0"})
                elif name in ("500", "502", "503"):
                    err = {"error": {"message": "The server had an error", "type": "server_error"}}
                    self._send(int(name), json.dumps(err).encode())
                elif name == "malformed":
                    self._send(200, b'{"choices": [{"message": {"content": "ye')
                elif name == "401echo":
                    err = {
                        "error": {"message": f"bad key {self.headers.get('Authorization')}", "type": "auth"}
                    }
                    self._send(401, json.dumps(err).encode())
                elif name == "empty_choices":
                    self._send(
                        200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
                    )
                else:
                    raise AssertionError(f"unknown scripted action {action!r}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a stalled handler never blocks shutdown
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
