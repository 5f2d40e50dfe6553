"""OpenAI chat-completions request parsing and the error/response shapes (no torch, no Serve, no FastAPI).

`parse_chat_request(body)` turns a decoded JSON body into a `ChatRequest` or raises `APIError` with the HTTP
status, OpenAI's error `type` and the offending `param` (`messages[1].content[0].type`), so every bad request is
refused before any image is decoded or any model work starts. Shapes follow openai-python's
`types/chat/*` (FORMATS.md section 7): responses `chat.completion` / `chat.completion.chunk`, errors
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image_url")
MAX_STOP_STRINGS = 4  # OpenAI's limit
# Fields OpenAI defines that we accept and ignore (they change nothing we could honour differently).
IGNORED_FIELDS = frozenset({"user", "frequency_penalty", "presence_penalty", "logit_bias", "metadata", "store",
                            "parallel_tool_calls", "service_tier", "response_format"})
KNOWN_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "seed", "stop", "stream", "stream_options", "n"}) | IGNORED_FIELDS

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered in OpenAI's shape; `status` is the HTTP code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatTurn:
    """One message after validation: its role, its text parts joined, and whether it carried the image."""

    role: str
    text: str


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    turns: tuple[ChatTurn, ...]
    image_url: str | None  # the one image of the conversation (Fuyu takes one, laid out before the text)
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{key}' must be a number, got {type(value).__name__}", key, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{key}' must be between {low} and {high}, got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {type(value).__name__}", key, "invalid_type")
    if value < low or (high is not None and value > high):
        raise _bad(f"'{key}' must be >= {low}" + (f" and <= {high}" if high is not None else "") + f", got {value}",
                   key)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise _bad("'stop' strings must not be empty", "stop")
    return tuple(stops)


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise _bad(f"'{where}' must be a string or a non-empty list of content parts", where, "invalid_type")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _bad(f"'{where}[{j}]' must be an object", f"{where}[{j}]", "invalid_type")
        kind = part.get("type")
        if kind not in CONTENT_TYPES:
            raise _bad(f"unsupported content type {kind!r} in '{where}[{j}]' (supported: text, image_url)",
                       f"{where}[{j}].type", "unsupported_content_type")
    return content


def _image_part_url(part: dict[str, Any], where: str) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _bad(f"'{where}.image_url.url' must be a non-empty string", f"{where}.image_url.url", "invalid_type")
    return url


def _parse_messages(messages: Any) -> tuple[tuple[ChatTurn, ...], str | None]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    turns: list[ChatTurn] = []
    image_url: str | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"unsupported role {role!r} in '{where}' (supported: {', '.join(ROLES)})",
                       f"{where}.role", "unsupported_role")
        texts = []
        for j, part in enumerate(_content_parts(message.get("content"), f"{where}.content")):
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"'{where}.content[{j}].text' must be a string", f"{where}.content[{j}].text",
                               "invalid_type")
                texts.append(part["text"])
                continue
            if role != "user":
                raise _bad(f"images are only accepted in user messages ('{where}' is {role})",
                           f"{where}.content[{j}]", "unsupported_content_type")
            if image_url is not None:
                raise _bad("this model takes one image per conversation; a second one is in "
                           f"'{where}.content[{j}]'", f"{where}.content[{j}]", "too_many_images")
            image_url = _image_part_url(part, f"{where}.content[{j}]")
        turns.append(ChatTurn(role, "\n".join(texts)))
    _check_order(turns)
    return tuple(turns), image_url


def _check_order(turns: list[ChatTurn]) -> None:
    """Optional system messages first, then user/assistant alternating, ending with a user message."""
    body = [t for t in turns if t.role != "system"]
    first_other = next((i for i, t in enumerate(turns) if t.role != "system"), len(turns))
    if any(t.role == "system" for t in turns[first_other:]):
        raise _bad("system messages must come before the conversation", "messages", "bad_message_order")
    if not body or body[-1].role != "user":
        raise _bad("the last message must be a user message", "messages", "bad_message_order")
    for k, turn in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            raise _bad(f"messages must alternate user/assistant; message {k + first_other} is {turn.role}",
                       f"messages[{k + first_other}].role", "bad_message_order")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded `/v1/chat/completions` body; `APIError(400)` naming the field when it is wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unsupported field(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise _bad("only n=1 is supported", "n", "unsupported_value")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    turns, image_url = _parse_messages(body.get("messages"))
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return ChatRequest(
        model=model,
        turns=turns,
        image_url=image_url,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


# ------------------------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: ChatRequest, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {
        "id": req.id, "object": "chat.completion", "created": req.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(req: ChatRequest, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          usage_counts: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices
        else [],
    }
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out
