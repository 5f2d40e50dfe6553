"""`otterhd chat`: an interactive terminal chat with a local model (no Ray, no Serve), streaming as it decodes.

Each line read is a user message; the answer prints token by token. `/image PATH` switches the image (and starts
a new conversation), `/reset` forgets the conversation, `/quit` (or end of input) leaves. The prompt is built and
decoded by the same `Engine` the server uses, so the terminal and the API answer alike.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from otterhd_ray.serve.engine import Delta, Engine, Failed, Finished
from otterhd_ray.serve.media import ImagePolicy, PreparedImage, prepare_image
from otterhd_ray.serve.protocol import APIError, ChatRequest, ChatTurn

HELP = "commands: /image PATH (new image, new conversation), /reset, /quit"


class ChatSession:
    """The conversation state of one terminal session."""

    def __init__(self, engine: Engine, *, max_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, resolution: int = -1) -> None:
        self.engine = engine
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self.resolution = resolution
        self.image: PreparedImage | None = None
        self.turns: list[ChatTurn] = []

    def set_image(self, path: str) -> None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"no such image file: {file}")
        self.image = prepare_image(file.read_bytes(), ImagePolicy(), self.resolution, param=str(file))
        self.turns = []

    def ask(self, text: str, out: TextIO) -> str:
        """Stream the answer to `out` as it decodes; keep the turn in the conversation."""
        turns = (*self.turns, ChatTurn("user", text))
        req = ChatRequest(model=None, turns=turns, image_url=None, **self.sampling)
        prepared = self.engine.prepare(req, self.image)
        parts: list[str] = []
        for events in self.engine.run_batch([prepared]):
            for _, event in events:
                if isinstance(event, Delta):
                    parts.append(event.text)
                    out.write(event.text)
                    out.flush()
                elif isinstance(event, Failed):
                    raise RuntimeError(event.message)
                elif isinstance(event, Finished) and event.reason == "length":
                    out.write(" [max tokens]")
        out.write("\n")
        answer = "".join(parts)
        self.turns = [*turns, ChatTurn("assistant", answer)]
        return answer


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"otterhd chat ({HELP})\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.turns = []
            stdout.write("(conversation reset)\n")
            continue
        try:
            if text.startswith("/image"):
                session.set_image(text[len("/image"):].strip())
                stdout.write("(image loaded; new conversation)\n")
            elif text.startswith("/"):
                stdout.write(f"unknown command {text.split()[0]!r}; {HELP}\n")
            else:
                session.ask(text, stdout)
        except (APIError, ValueError) as err:  # a bad image or an over-long prompt: say so, keep chatting
            stdout.write(f"error: {getattr(err, 'message', err)}\n")


def chat_main(options: Any, image: str | None, max_tokens: int | None, temperature: float, top_p: float,
              seed: int | None) -> int:
    from otterhd_ray.serve.build import load_engine

    session = ChatSession(load_engine(options), max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          resolution=options.resolution)
    if image:
        session.set_image(image)
    return run_chat(session)
