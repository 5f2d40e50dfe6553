"""Judge pieces that need no server: yes/no reading, backoff, Retry-After, cache, rule judge, selection.
The HTTP behaviour (429 / 500 / stalls / malformed bodies / key secrecy) is tested against a real local server
in tests/integration/test_eval_pipeline.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from otterhd_ray.eval.config import JudgeConfig
from otterhd_ray.eval.judge import (
    JUDGE_SYSTEM_PROMPT,
    JudgeCache,
    JudgeRequest,
    OpenAIJudge,
    RuleJudge,
    backoff_delay,
    build_judge_prompt,
    judge_all,
    make_judge,
    parse_retry_after,
    parse_yes_no,
    redact,
)


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("yes", True),
        ("Yes.", True),
        ("YES", True),
        ("**Yes**", True),
        ("Yes, the response matches.", True),
        ("no", False),
        ("No.", False),
        ("  NO!  ", False),
        ("Nope", None),
        ("yesterday", None),
        ("The answer is yes", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_yes_no(reply, verdict):
    assert parse_yes_no(reply) is verdict


def test_seed_prompt_verbatim():
    assert JUDGE_SYSTEM_PROMPT == (
        "You are a helpful AI assistant. Your task is to judge whether the model response is correct to answer "
        "the given question or not."
    )
    assert build_judge_prompt("Q?", "R", "T") == (
        "Question: Q?\nModel Response: R\nGround Truth: T\n"
        "Will the model response be considered correct? You should only answer yes or no."
    )


def test_backoff_is_exponential_jittered_capped_and_honours_retry_after():
    rng = random.Random(0)
    for attempt in range(8):
        d = backoff_delay(attempt, base=1.0, cap=10.0, retry_after=None, rng=rng)
        assert 0.0 <= d <= min(10.0, 2.0**attempt)
    assert backoff_delay(0, 1.0, 10.0, retry_after=7.0, rng=rng) >= 7.0
    assert backoff_delay(0, 1.0, 10.0, retry_after=500.0, rng=rng) == 10.0  # capped
    delays = {round(backoff_delay(3, 1.0, 100.0, None, random.Random(s)), 6) for s in range(20)}
    assert len(delays) > 10  # jittered, not a fixed schedule


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({"retry-after": "soon"}) is None


def test_cache_roundtrip_and_torn_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JudgeCache(path)
    cache.put("gpt-4-0613", "p1", "Yes", True)
    cache.put("gpt-4-0613", "p2", "No", False)
    with path.open("a") as f:
        f.write('{"key": "trunc')  # a crash mid-write
    again = JudgeCache(path)
    assert len(again) == 2
    assert again.get("gpt-4-0613", "p1")["verdict"] is True
    assert again.get("other-model", "p1") is None  # keyed by model too


def test_rule_judge():
    judge = RuleJudge()
    opts = ("red", "green", "blue", "yellow")

    def v(resp, truth="green"):
        return judge.verdict(JudgeRequest("x", "q?", resp, truth, opts))

    assert v("green") and v("Green.") and v("The green one") and v("It is green")
    assert not v("red") and not v("green or red") and not v("") and not v("greenish")
    result = asyncio.run(judge.judge(JudgeRequest("x", "q?", "green", "green", opts)))
    assert result.verdict is True and result.judged


def test_make_judge_selection(tmp_path):
    assert make_judge(JudgeConfig(), None, None).kind == "rule"
    assert make_judge(JudgeConfig(), "sk-x", tmp_path / "c.jsonl").kind == "openai"
    assert make_judge(JudgeConfig(kind="rule"), "sk-x", None).kind == "rule"
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_judge(JudgeConfig(kind="openai"), None, None)
    with pytest.raises(ValueError, match="api_version"):
        make_judge(JudgeConfig(kind="openai", api_type="azure"), "sk-x", None)


def test_cached_verdict_sends_no_request(tmp_path):
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=0.5)
    cache = JudgeCache(tmp_path / "c.jsonl")
    cache.put(cfg.model, build_judge_prompt("q?", "r", "t"), "yes", True)
    judge = OpenAIJudge(cfg, "sk-unused-key", cache)
    (res,) = asyncio.run(judge_all(judge, [JudgeRequest("1", "q?", "r", "t")]))
    assert res.verdict is True and res.cached and judge.stats.requests == 0
    assert "sk-unused-key" not in repr(judge)


def test_redact():
    assert redact("auth Bearer sk-abcdef failed", "sk-abcdef") == "auth Bearer [REDACTED] failed"
    assert redact("nothing", None) == "nothing"
