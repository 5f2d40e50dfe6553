"""`stream_generate`: greedy streams equal `generate` on both decoding paths; stop ids, per-row budgets,
cancellation mid-stream; seeded sampling is reproducible, different seeds differ, and top_p -> 0 is greedy."""

from __future__ import annotations

import pytest
import torch

from otterhd_ray.models.fuyu import SamplingParams, flavour_config, new_model, prefix_groups, stream_generate
from tests import helpers

CFG = flavour_config("debug")
IMG, NL, BOS = CFG.image_token_id, CFG.image_token_id + 1, CFG.bos_token_id


def questions(rows: int, cols: int, num: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return helpers.questions(CFG, rows, cols, num, seed)


PROMPTS = questions(2, 3, 2, 0) + questions(0, 0, 1, 1) + questions(3, 2, 3, 2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return new_model(CFG, attention="eager").eval()


def collect(steps) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """(tokens per prompt, the raw steps)."""
    steps = list(steps)
    rows: list[list[int]] = [[] for _ in PROMPTS]
    for step in steps:
        for b, token in step:
            rows[b].append(token)
    return rows, steps


def greedy(n: int, **kw) -> list[SamplingParams]:
    return [SamplingParams(n, **kw) for _ in PROMPTS]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_greedy_stream_equals_generate(model, share_prefix):
    ref = model.generate(PROMPTS, 7, [], share_prefix=share_prefix, min_shared_tokens=1)
    rows, steps = collect(stream_generate(model, PROMPTS, greedy(7), share_prefix=share_prefix, min_shared_tokens=1))
    assert rows == ref and all(len(r) == 7 for r in rows)
    assert len(steps) == 7 and all([b for b, _ in s] == list(range(len(PROMPTS))) for s in steps)
    # and both paths agree with each other (the grouped one really groups here)
    assert [m for m, _ in prefix_groups(PROMPTS, IMG, min_shared_tokens=1)] == [[0, 1], [2], [3, 4, 5]]
    assert rows == model.generate(PROMPTS, 7, [], share_prefix=not share_prefix, min_shared_tokens=1)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_stop_ids_and_per_row_budgets(model, share_prefix):
    full = model.generate(PROMPTS, 8, [], share_prefix=share_prefix, min_shared_tokens=1)
    stop = full[0][2]
    budgets = [8, 3, 1, 0, 5, 8]
    params = [SamplingParams(n, stop_ids=frozenset({stop})) for n in budgets]
    rows, steps = collect(stream_generate(model, PROMPTS, params, share_prefix=share_prefix, min_shared_tokens=1))
    for row, ref, n in zip(rows, full, budgets, strict=True):
        cut = ref[:n]
        if stop in cut:
            cut = cut[: cut.index(stop) + 1]  # the stop id is emitted, then the row ends
        assert row == cut
    assert len(steps) == max(len(r) for r in rows)
    assert 3 not in [b for b, _ in steps[0]]  # a row with max_new_tokens=0 never appears
    assert [b for b, _ in steps[0]] == [0, 1, 2, 4, 5]  # the first yield: every row's first token


@pytest.mark.parametrize("share_prefix", [True, False])
def test_cancellation_mid_stream(model, share_prefix):
    full = model.generate(PROMPTS, 6, [], share_prefix=share_prefix, min_shared_tokens=1)
    cancelled: set[int] = set()  # empty when passed: the stream must keep watching this very set
    rows: list[list[int]] = [[] for _ in PROMPTS]
    steps = stream_generate(model, PROMPTS, greedy(6), share_prefix=share_prefix, cancelled=cancelled,
                            min_shared_tokens=1)
    cancelled.add(4)  # before the first step: never appears
    for i, step in enumerate(steps):
        for b, token in step:
            rows[b].append(token)
        if i == 1:
            cancelled.add(1)  # after two tokens
    assert rows[4] == [] and rows[1] == full[1][:2]
    for b in (0, 2, 3, 5):
        assert rows[b] == full[b]
    everyone = set(range(len(PROMPTS)))
    assert list(stream_generate(model, PROMPTS, greedy(6), share_prefix=share_prefix, cancelled=everyone)) == []


def test_sampling_is_seeded_per_row(model):
    def sample(prompts, params):
        rows, _ = collect(stream_generate(model, prompts, params, min_shared_tokens=1))
        return rows[: len(prompts)]

    hot = [SamplingParams(10, temperature=1.5, seed=b) for b in range(len(PROMPTS))]
    first = sample(PROMPTS, hot)
    assert sample(PROMPTS, hot) == first  # same seeds, same tokens
    # a row's draws come from its own generator: alone, or beside greedy rows, it samples the same tokens
    alone = [p if b == 4 else SamplingParams(10) for b, p in enumerate(hot)]
    assert sample(PROMPTS, alone)[4] == first[4]
    other = [SamplingParams(10, temperature=1.5, seed=100 + b) for b in range(len(PROMPTS))]
    assert sample(PROMPTS, other) != first
    assert first != model.generate(PROMPTS, 10, [], min_shared_tokens=1)  # sampling is not greedy at this temperature
    unseeded = [SamplingParams(10, temperature=1.5) for _ in PROMPTS]
    assert sample(PROMPTS, unseeded) != sample(PROMPTS, unseeded)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_top_p_to_zero_is_greedy(model, share_prefix):
    params = [SamplingParams(6, temperature=2.0, top_p=0.0, seed=b) for b in range(len(PROMPTS))]
    rows, _ = collect(stream_generate(model, PROMPTS, params, share_prefix=share_prefix, min_shared_tokens=1))
    assert rows == model.generate(PROMPTS, 6, [], share_prefix=share_prefix, min_shared_tokens=1)


def test_top_p_keeps_the_nucleus():
    from otterhd_ray.models.fuyu.generate import _nucleus

    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    out = _nucleus(probs, torch.tensor([0.7, 1.0, 0.0]))
    assert out[0].tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])  # 0.5 < 0.7 <= 0.8: the top two
    assert out[1].tolist() == pytest.approx(probs[1].tolist())  # top_p = 1 keeps everything
    assert (out[2] > 0).sum() == 1  # top_p = 0 keeps exactly one token


def test_bad_arguments_fail_before_any_work(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(4, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=1.5)
    assert SamplingParams(4, stop_ids=[3, 3, 5]).stop_ids == frozenset({3, 5})
    with pytest.raises(ValueError, match="sampling params"):
        stream_generate(model, PROMPTS, greedy(4)[:2])
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        stream_generate(model, PROMPTS, greedy(4), prefill_chunk_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        stream_generate(model, [(torch.tensor([], dtype=torch.long), None)], [SamplingParams(4)])
    assert list(stream_generate(model, [], [])) == []


def test_stream_does_not_leak_no_grad(model):
    steps = stream_generate(model, PROMPTS, greedy(3))
    next(steps)
    assert torch.is_grad_enabled()  # between steps the caller's grad mode holds
    assert len(list(steps)) == 2


@pytest.mark.parametrize("share_prefix", [True, False])
def test_the_next_step_is_queued_ahead_only_while_a_row_can_continue(model, share_prefix, monkeypatch):
    """The step after the one being handed out is queued before its tokens are read (overlap), but never when
    every row reaches its budget: max budget - 1 decode steps, as without the overlap."""
    from otterhd_ray.models.fuyu import generate as gen

    monkeypatch.setattr(gen, "_queues_ahead", lambda device: True)  # the CUDA order, on CPU
    cls = gen._GroupedDecoding if share_prefix else gen._UnsharedDecoding
    calls: list[int] = []
    real_step = cls.step
    monkeypatch.setattr(cls, "step", lambda self, next_B: calls.append(1) or real_step(self, next_B))
    budgets = [5, 3, 1, 0, 5, 2]
    rows, _ = collect(stream_generate(model, PROMPTS, [SamplingParams(n) for n in budgets],
                                      share_prefix=share_prefix, min_shared_tokens=1))
    assert [len(r) for r in rows] == budgets
    assert len(calls) == max(budgets) - 1
    ref = model.generate(PROMPTS, 5, [], share_prefix=share_prefix, min_shared_tokens=1)
    assert rows == [r[:n] for r, n in zip(ref, budgets, strict=True)]
    # a cancel ends rows early in the queued-ahead order too
    cancelled: set[int] = set()
    steps = stream_generate(model, PROMPTS, greedy(5), share_prefix=share_prefix, cancelled=cancelled,
                            min_shared_tokens=1)
    got: list[list[int]] = [[] for _ in PROMPTS]
    for i, step in enumerate(steps):
        for b, token in step:
            got[b].append(token)
        if i == 1:
            cancelled.update(range(len(PROMPTS)))
    assert got == [r[:2] for r in ref]
