"""The generation engine behind the server: chat request -> prompt tensors, and one batch -> streamed text.

Plain Python + torch, no Serve: `Engine.prepare` builds a prompt exactly as training lays a conversation out
(the image's `|SPEAKER|`/`|NEWLINE|` rows, `<s>`, then per turn `template(user) <0x04>`, ` answer`, end token,
ending with the open `template(user) <0x04>`), checks it against the context, and `Engine.run_batch` drives the
model's `stream_generate` over a batch, turning each row's tokens into text deltas with stop strings applied.

Tensor names: `T` prompt tokens, `P` image patches, `C` = 2700 patch values.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, MutableSet, Sequence
from dataclasses import dataclass, field
from typing import Any

from otterhd_ray.serve.media import PreparedImage
from otterhd_ray.serve.protocol import APIError, ChatRequest

# stream_generate(model, prompts, params, *, share_prefix, cancelled) -> per step [(prompt_index, token_id)]
StreamFn = Callable[..., Iterator[list[tuple[int, int]]]]
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PROMPT_STYLES = {"otterhd": "User:{instruction} Assistant:", "fuyu": "{instruction}"}


@dataclass
class Prepared:
    """A validated request, ready for the batch: prompt tensors and its sampling parameters."""

    request: ChatRequest
    input_ids_T: Any  # torch int64 [T]
    patches_PC: Any  # torch uint8 [P, 2700] or None
    params: Any  # models.fuyu SamplingParams
    image_digest: str = ""

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.input_ids_T.shape[0])


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class RowDecoder:
    """Token ids of one row -> text deltas whose concatenation is the decode of all ids.

    Held back until it is final: text that may still become a stop string, and a run of byte-fallback pieces
    (`<0xE1>`...): the tokenizer decodes a run together and turns every byte of an invalid run into U+FFFD, so
    `|` from `<0x7C>` becomes `\ufffd` once `<0xE1>` follows; decoding is prefix-stable only between runs."""

    decode: Callable[[list[int]], str]
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    max_tokens: int
    byte_ids: frozenset[int] = frozenset()
    ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    sent: str = ""
    finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Add one generated token; returns the new text to send (may be empty). Sets `finish_reason` at the end."""
        self.num_tokens += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._flush(self.text())
        self.ids.append(token)
        text = self.text()
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            return self._flush(text[:cut])
        if self.num_tokens >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush(text)
        if token in self.byte_ids:
            return ""
        hold = max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._flush(text[: len(text) - hold])

    def text(self) -> str:
        # The answer follows "<0x04> " in training, so its first piece carries a word-start space: drop it.
        return self.decode(self.ids).lstrip()

    def _flush(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: keep what was sent
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class Engine:
    """Model + tokenizer + limits. `prepare` runs on the request path; `run_batch` on the one model thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        stream_fn: StreamFn | None = None,
        prompt_style: str = "otterhd",
        default_max_tokens: int = 256,
        max_context: int | None = None,
        share_prefix: bool = True,
    ) -> None:
        from otterhd_ray.data.tokenizer import BOA_TOKEN, fuyu_tokens

        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {sorted(PROMPT_STYLES)}, got {prompt_style!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokens = fuyu_tokens(tokenizer)
        self.template = PROMPT_STYLES[prompt_style]
        self._boa = BOA_TOKEN
        self.byte_ids = frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))
        self.stop_ids = frozenset({self.tokens.end} | ({int(tokenizer.eos_token_id)}
                                                       if tokenizer.eos_token_id is not None else set()))
        self.default_max_tokens = default_max_tokens
        self.max_context = max_context or int(model.config.max_position_embeddings)
        self.share_prefix = share_prefix
        self._stream_fn = stream_fn
        # HF fast tokenizers are not safe to call from two threads at once (encode on the request path,
        # decode on the model thread).
        self._tok_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- prompt
    def _encode(self, text: str, param: str, prompt: bool) -> list[int]:
        """Tokenize one segment; a prompt segment ends with `<0x04>`, and no user text may encode to a
        reserved token (a fake image placeholder breaks the patch count, a fake boa/end a turn boundary)."""
        with self._tok_lock:
            ids = list(self.tokenizer(text + (self._boa if prompt else ""), add_special_tokens=False)["input_ids"])
        body = ids[:-1] if prompt else ids
        reserved = {self.tokens.image, self.tokens.newline, self.tokens.boa, self.tokens.end}
        if reserved.intersection(body):
            raise APIError(400, f"'{param}' contains text that encodes to a reserved token (image placeholder, "
                           "answer or end marker)", param, "reserved_token")
        assert not prompt or ids[-1] == self.tokens.boa, "the tokenizer split <0x04>"  # FuyuProcessor checked it
        return ids

    def prompt_ids(self, req: ChatRequest, grid: tuple[int, int] | None) -> list[int]:
        """Token ids of the conversation, after the image rows (or just `<s>` without an image)."""
        from otterhd_ray.data.processor import image_token_ids

        ids = image_token_ids(grid, self.tokens) if grid else [self.tokens.bos]
        system = "\n\n".join(t.text for t in req.turns if t.role == "system")
        turns = [(i, t) for i, t in enumerate(req.turns) if t.role != "system"]
        first = True
        for i, turn in turns:
            param = f"messages[{i}].content"
            if turn.role == "user":
                text = f"{system}\n\n{turn.text}" if first and system else turn.text
                first = False
                ids += self._encode(self.template.replace("{instruction}", text), param, prompt=True)
            else:
                ids += self._encode(" " + turn.text, param, prompt=False) + [self.tokens.end]
        return ids

    def prepare(self, req: ChatRequest, image: PreparedImage | None) -> Prepared:
        """Prompt tensors + sampling params; `APIError(400)` naming the limit when it does not fit the context."""
        import torch

        from otterhd_ray.models.fuyu import SamplingParams

        ids = self.prompt_ids(req, image.grid if image else None)
        room = self.max_context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens (image included); this model's context is "
                           f"{self.max_context} tokens", "messages", "context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens > room:
            raise APIError(400, f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together over "
                           f"this model's context of {self.max_context} tokens", "max_tokens",
                           "context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, stop_ids=self.stop_ids)
        patches = torch.from_numpy(image.patches_PC) if image else None
        return Prepared(req, torch.tensor(ids, dtype=torch.long), patches, params, image.digest if image else "")

    # ------------------------------------------------------------------------------------------ decoding
    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stream(self) -> StreamFn:
        if self._stream_fn is None:
            from otterhd_ray.models.fuyu import stream_generate

            self._stream_fn = stream_generate
        return self._stream_fn

    def run_batch(
        self, batch: Sequence[Prepared], cancelled: MutableSet[int] | None = None
    ) -> Iterator[list[tuple[int, Event]]]:
        """Decode a batch; yields per model step the `(row, event)` pairs it produced (possibly none: text held back),
        then each unfinished row's `Finished`.

        A row is added to `cancelled` when it finishes on a stop string (the model stops it at the next step);
        rows the caller puts in `cancelled` end with reason "cancelled". Blocking: run it on the model thread."""
        import torch

        cancelled = set() if cancelled is None else cancelled
        rows = [RowDecoder(self.decode, p.params.stop_ids, p.request.stop, p.params.max_new_tokens, self.byte_ids)
                for p in batch]
        prompts = [(p.input_ids_T, p.patches_PC) for p in batch]
        with torch.inference_mode():
            steps = self._stream()(self.model, prompts, [p.params for p in batch], share_prefix=self.share_prefix,
                                   cancelled=cancelled)
            for step in steps:
                events: list[tuple[int, Event]] = []
                for index, token in step:
                    row = rows[index]
                    if row.finish_reason is not None or index in cancelled:
                        continue  # ended on a stop string or cancelled; the model stops it at the next step
                    text = row.push(int(token))
                    if text:
                        events.append((index, Delta(text)))
                    if row.finish_reason is not None:
                        cancelled.add(index)
                        events.append((index, self._finished(row, batch[index])))
                yield events  # even when empty: the first yield marks every row's first token (server TTFT)
        tail = [(i, self._finished(row, batch[i], "cancelled" if i in cancelled else "length"))
                for i, row in enumerate(rows) if row.finish_reason is None]
        if tail:
            yield tail

    @staticmethod
    def _finished(row: RowDecoder, prepared: Prepared, default: str = "length") -> Finished:
        return Finished(row.finish_reason or default, prepared.num_prompt_tokens, row.num_tokens)


def group_by_image(batch: list[Any], key: Callable[[Any], str]) -> list[Any]:
    """Stable order with equal images side by side: `stream_generate` shares one prefill per run of them."""
    first_seen: dict[str, int] = {}
    for i, item in enumerate(batch):
        first_seen.setdefault(key(item), i)
    return sorted(batch, key=lambda item: first_seen[key(item)])

