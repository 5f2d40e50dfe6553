"""Free-form judge: the seed's GPT-4 yes/no judgment, made robust, or a rule-based fallback without a key.

OpenAI judge: the official `openai` client (OpenAI, Azure OpenAI or any OpenAI-compatible `base_url`), the
seed's prompt verbatim, temperature 0, a few output tokens. Requests run concurrently under a semaphore. The
client's own retries are disabled (`max_retries=0`) so that the retry policy is this module's and testable:
429 / 5xx / timeouts / connection errors / malformed bodies are retried with exponential backoff and full jitter,
honouring `Retry-After` (capped at `backoff_max`). A verdict is cached on disk keyed by (model, prompt) so a
rerun costs nothing. A judgment that still failed is `unjudged` (reported, never counted wrong).

`ask()` is the engine (any prompt, any reply parser: the MagnifierBench yes/no, MathVista's answer extraction,
MM-Vet's 0-1 score); `judge()` is the seed's yes/no judgment on top of it. A failure that cannot heal (401 / 403:
the key; 404: the model or endpoint) stops the judge at the first one: it is logged once, `fatal_error` names the
cause and every later question is answered "not judged" without a request, so a rerun with the right key judges
the kept predictions and nothing else.

The API key is passed to the client and nowhere else: errors are redacted before they are stored or logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import re
import string
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from otterhd_ray.eval.scoring import normalize_text

if TYPE_CHECKING:  # annotations only: eval.config imports the benchmark registry, which imports the judge
    from otterhd_ray.eval.config import JudgeConfig

log = logging.getLogger(__name__)

# The seed's judge prompt (OtterHD `pipeline/benchmarks/datasets/magnifierbench.py`), verbatim.
JUDGE_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. Your task is to judge whether the model response is correct to answer the "
    "given question or not."
)
JUDGE_USER_TEMPLATE = (
    "Question: {question}\nModel Response: {response}\nGround Truth: {ground_truth}\n"
    "Will the model response be considered correct? You should only answer yes or no."
)


def build_judge_prompt(question: str, response: str, ground_truth: str) -> str:
    return JUDGE_USER_TEMPLATE.format(question=question, response=response, ground_truth=ground_truth)


_STRIP = string.punctuation + string.whitespace + "“”‘’"


def parse_yes_no(reply: str | None) -> bool | None:
    """'Yes', 'yes.', '**YES**', 'Yes, it is' -> True; 'No.', 'no' -> False; anything else -> None."""
    if not reply:
        return None
    words = reply.strip(_STRIP).lower().split()
    if not words:
        return None
    first = words[0].strip(_STRIP)
    if first == "yes":
        return True
    if first == "no":
        return False
    return None


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[REDACTED]")
    return text


@dataclass(frozen=True)
class JudgeRequest:
    item_id: str
    question: str
    response: str
    ground_truth: str
    options: tuple[str, ...] = ()  # every option's text; the rule judge uses them to refuse hedged answers


@dataclass
class JudgeResult:
    item_id: str
    verdict: bool | None  # None: unjudged
    reply: str = ""
    error: str = ""
    attempts: int = 0
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def judged(self) -> bool:
        return self.verdict is not None


@dataclass(frozen=True)
class Ask:
    """One question to the judge model; `parse` turns its reply into a value, None when unreadable."""

    item_id: str
    prompt: str
    system: str | None
    parse: Callable[[str], Any]
    max_tokens: int | None = None  # None: judge.max_tokens
    temperature: float | None = None  # None: judge.temperature
    unreadable: str = "unreadable judge reply"


@dataclass
class AskResult:
    item_id: str
    value: Any = None  # None: not judged (failed or unreadable); never counted as wrong
    reply: str = ""
    error: str = ""
    attempts: int = 0
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class JudgeStats:
    kind: str
    model: str = ""
    requests: int = 0  # HTTP requests actually sent
    retries: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retry_reasons"] = dict(self.retry_reasons)
        return d


class Judge(Protocol):
    kind: str
    stats: JudgeStats

    async def judge(self, request: JudgeRequest) -> JudgeResult: ...


# --------------------------------------------------------------------------------------------- cache
class JudgeCache:
    """Append-only JSONL of judge replies keyed by sha256(model, system prompt, user prompt).

    Only replies that parsed are stored (a failed or unreadable judgment is asked again on the next run); a hit
    is parsed again by the asker. A torn last line (crash mid-write) is ignored on load.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model: str, prompt: str, system: str | None = JUDGE_SYSTEM_PROMPT) -> str:
        # The MagnifierBench key (system = the seed's judge prompt) is unchanged, so older caches stay valid.
        return hashlib.sha256(f"{model}\x00{system or ''}\x00{prompt}".encode()).hexdigest()

    def get(self, model: str, prompt: str, system: str | None = JUDGE_SYSTEM_PROMPT) -> dict[str, Any] | None:
        return self._entries.get(self.key(model, prompt, system))

    def put(
        self, model: str, prompt: str, reply: str, verdict: Any, system: str | None = JUDGE_SYSTEM_PROMPT
    ) -> None:
        entry = {"key": self.key(model, prompt, system), "model": model, "reply": reply, "verdict": verdict}
        with self._lock:
            self._entries[entry["key"]] = entry
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                    f.flush()

    def __len__(self) -> int:
        return len(self._entries)


# ------------------------------------------------------------------------------------------- retries
class RetryableError(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
    except Exception:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    """Full-jitter exponential backoff (attempt 0 = first retry); a server's Retry-After is a floor."""
    delay = rng.uniform(0.0, min(cap, base * (2.0**attempt)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def classify_openai_error(err: BaseException) -> RetryableError | None:
    """A retryable error (with its reason and Retry-After), or None when retrying cannot help."""
    import openai

    if isinstance(err, openai.APITimeoutError):
        return RetryableError("timeout", str(err))
    if isinstance(err, openai.APIConnectionError):
        return RetryableError("connection", str(err))
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        retry_after = parse_retry_after(getattr(err.response, "headers", None))
        if status == 429:
            return RetryableError("429", str(err), retry_after)
        if status >= 500 or status in (408, 409):
            return RetryableError(str(status) if status < 600 else "5xx", str(err), retry_after)
        return None  # 400 / 401 / 403 / 404 / 422: a request or credential problem
    if isinstance(err, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, KeyError)):
        return RetryableError("malformed", str(err))
    return None


FATAL_STATUS = (401, 403, 404)


def is_fatal_openai_error(err: BaseException) -> bool:
    """401 / 403 (the key) or 404 (model or endpoint): every later request fails the same way."""
    import openai

    return isinstance(err, openai.APIStatusError) and err.status_code in FATAL_STATUS


# ---------------------------------------------------------------------------------------------- judges
class OpenAIJudge:
    kind = "openai"

    def __init__(
        self,
        cfg: JudgeConfig,
        api_key: str,
        cache: JudgeCache,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ):
        if not api_key:
            raise ValueError("the OpenAI judge needs an API key (OPENAI_API_KEY or the config's api_key)")
        if cfg.api_type == "azure" and not (cfg.base_url and cfg.api_version):
            raise ValueError(
                "judge.api_type azure needs judge.base_url (the Azure endpoint) and judge.api_version"
            )
        self.cfg = cfg
        self._api_key = api_key
        self.cache = cache
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self.stats = JudgeStats(kind=self.kind, model=cfg.model)
        self.fatal_error = ""  # set by the first failure that cannot heal (bad key, unknown model)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIJudge(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            common = {"api_key": self._api_key, "timeout": self.cfg.timeout, "max_retries": 0}
            if self.cfg.api_type == "azure":
                self._client = openai.AsyncAzureOpenAI(
                    azure_endpoint=self.cfg.base_url, api_version=self.cfg.api_version, **common
                )
            else:
                self._client = openai.AsyncOpenAI(base_url=self.cfg.base_url, **common)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _ask_once(self, ask: Ask, temperature: float) -> tuple[str, int, int]:
        self.stats.requests += 1
        messages = [{"role": "system", "content": ask.system}] if ask.system else []
        messages.append({"role": "user", "content": ask.prompt})
        completion = await self._get_client().chat.completions.create(
            model=self.cfg.model,
            messages=messages,
            temperature=temperature,
            max_tokens=ask.max_tokens or self.cfg.max_tokens,
        )
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise ValueError("response without choices[0].message.content") from None
        if not isinstance(content, str):
            raise ValueError("response content is not a string")
        usage = getattr(completion, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        return content, prompt_tokens, completion_tokens

    def _stop(self, item_id: str, error: str) -> None:
        """The first failure that cannot heal: one line naming the cause; later questions are not sent."""
        if self.fatal_error:
            return
        self.fatal_error = error
        log.error(
            "judging stopped at item %s: %s (fix the judge key/model and rerun: only judging is left)",
            item_id,
            error,
        )

    async def ask(self, ask: Ask) -> AskResult:
        """One question with the cache, the retry policy and the fatal stop; the reply goes through ask.parse."""
        result = AskResult(ask.item_id, None)
        if self.fatal_error:
            result.error = f"not judged: {self.fatal_error}"
            return result
        hit = self.cache.get(self.cfg.model, ask.prompt, ask.system)
        if hit is not None and ask.parse(str(hit.get("reply", ""))) is not None:
            self.stats.cache_hits += 1
            result.value, result.reply, result.cached = ask.parse(hit["reply"]), hit["reply"], True
            return result
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        temperature = self.cfg.temperature if ask.temperature is None else ask.temperature
        async with self._sem:
            for attempt in range(self.cfg.max_retries + 1):
                if self.fatal_error:  # another request failed for good while this one waited
                    result.error = f"not judged: {self.fatal_error}"
                    return result
                result.attempts = attempt + 1
                try:
                    reply, p_tok, c_tok = await self._ask_once(ask, temperature)
                except Exception as err:  # noqa: BLE001 - every failure is classified, none escapes
                    result.error = redact(f"{type(err).__name__}: {err}", self._api_key)[:500]
                    if is_fatal_openai_error(err):
                        self._stop(ask.item_id, result.error)
                        return result
                    retry = classify_openai_error(err)
                    if retry is None or attempt == self.cfg.max_retries:
                        log.warning("judge gave up on item %s: %s", ask.item_id, result.error)
                        return result
                    self.stats.retries += 1
                    self.stats.retry_reasons[retry.reason] += 1
                    delay = backoff_delay(
                        attempt, self.cfg.backoff_base, self.cfg.backoff_max, retry.retry_after, self._rng
                    )
                    await self._sleep(delay)
                    continue
                result.prompt_tokens += p_tok
                result.completion_tokens += c_tok
                self.stats.prompt_tokens += p_tok
                self.stats.completion_tokens += c_tok
                result.reply = reply
                value = ask.parse(reply)
                if value is None:
                    # Unreadable: at the same temperature the same text comes back; the asker may rephrase.
                    result.error = ask.unreadable
                    return result
                result.value, result.error = value, ""
                self.cache.put(self.cfg.model, ask.prompt, reply, value, ask.system)
                return result
        return result

    async def judge(self, request: JudgeRequest) -> JudgeResult:
        """The seed's yes/no judgment of a free-form answer."""
        prompt = build_judge_prompt(request.question, request.response, request.ground_truth)
        res = await self.ask(
            Ask(
                request.item_id,
                prompt,
                JUDGE_SYSTEM_PROMPT,
                parse_yes_no,
                unreadable="reply is neither yes nor no",
            )
        )
        return JudgeResult(
            request.item_id,
            res.value,
            reply=res.reply,
            error=res.error,
            attempts=res.attempts,
            cached=res.cached,
            prompt_tokens=res.prompt_tokens,
            completion_tokens=res.completion_tokens,
        )


class RuleJudge:
    """No key: the response is correct when, normalised, it is the correct option's text, or contains it as
    whole words while naming no other option (so "red or blue" is not credited for "red")."""

    kind = "rule"

    def __init__(self) -> None:
        self.stats = JudgeStats(kind=self.kind, model="normalised-match")
        self.fatal_error = ""

    @staticmethod
    def _contains(haystack: str, needle: str) -> bool:
        return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None

    def verdict(self, request: JudgeRequest) -> bool:
        response = normalize_text(request.response)
        truth = normalize_text(request.ground_truth)
        if not response or not truth:
            return False
        if response == truth:
            return True
        others = [normalize_text(o) for o in request.options if normalize_text(o) != truth]
        if not self._contains(response, truth):
            return False
        return not any(self._contains(response, o) and not self._contains(truth, o) for o in others)

    async def judge(self, request: JudgeRequest) -> JudgeResult:
        return JudgeResult(request.item_id, self.verdict(request), reply="rule", attempts=1)


def make_judge(
    cfg: JudgeConfig, api_key: str | None, cache_path: str | Path | None
) -> OpenAIJudge | RuleJudge:
    """auto -> OpenAI judge when a key is known, else the rule judge; openai without a key is an error."""
    if cfg.kind == "rule" or (cfg.kind == "auto" and not api_key):
        return RuleJudge()
    if not api_key:
        raise ValueError(f"judge.kind is 'openai' but no API key: set {cfg.api_key_env} or judge.api_key")
    return OpenAIJudge(cfg, api_key, JudgeCache(cache_path))


async def judge_all(judge: Judge, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
    """Judge every request concurrently (bounded by the judge), results in request order."""
    return list(await asyncio.gather(*(judge.judge(r) for r in requests)))
