"""Evaluation end to end on a local Ray: predictor actor pool -> judge -> files -> report.

- a fake predictor (no model) exercises the pipeline, crash + resume, and the judges;
- the OpenAI judge talks to a REAL OpenAI-compatible HTTP server on 127.0.0.1 (fake_openai.py) that answers,
  rate-limits (429 + Retry-After), fails (500/503), stalls past the client timeout and returns malformed bodies;
  every item ends judged, retries are counted, a rerun is answered from the cache, and the API key appears in
  no log, output or file;
- the debug model (random init, saved as an HF dir) runs on CPU actors when the model, processor and synth
  modules are present.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from otterhd_ray.eval.config import BenchmarkConfig, JudgeConfig
from otterhd_ray.eval.judge import JudgeCache, JudgeRequest, OpenAIJudge, judge_all
from otterhd_ray.eval.pipeline import PREDICTIONS_FILE, run_evaluation

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

ray = pytest.importorskip("ray")
SECRET = "sk-test-SECRET-0123456789abcdef"


# ------------------------------------------------------------------------------------------- fakes
class FakePredictor:
    """Same constructor and columns as eval.predictor.Predictor (no model). MagnifierBench items (two prompts)
    get option A as letter and text; every other question gets "A"."""

    def __init__(self, model_path, resolution=-1, max_new_tokens=8, device="auto", dtype="auto", **kwargs):
        self.model_path = model_path

    def _option_a(self, mc_text: str) -> str:
        return re.search(r"A\. (.+?), B\. ", mc_text).group(1)

    def _fail(self, item_id: str) -> bool:
        return False

    def _answers(self, texts: list[str]) -> list[str]:
        return ["A", self._option_a(texts[0])] if len(texts) == 2 else ["A"] * len(texts)

    def __call__(self, batch):
        ids = [str(x) for x in batch["id"]]
        for i in ids:
            if self._fail(i):
                raise RuntimeError(f"simulated actor failure on {i}")
        n = len(ids)
        answers = [json.dumps(self._answers(json.loads(str(t)))) for t in batch["texts"]]
        return {
            "id": np.asarray(ids, dtype=object),
            "responses": np.asarray(answers, dtype=object),
            "num_prompt_tokens": np.full(n, 10),
            "num_new_tokens": np.full(n, 1),
            "generate_s": np.zeros(n),
            "error": np.asarray([""] * n, dtype=object),
        }


class CrashingPredictor(FakePredictor):
    """Dies on the batch holding the 7th item: the run stops early (an actor crash, an OOM)."""

    def _fail(self, item_id: str) -> bool:
        return item_id.endswith("0006")


# Ray workers cannot import this test module by name: ship these classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from otterhd_ray.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_train=0, num_bench=10, seed=3)
    return out / "magnifierbench"


def _answers(bench_dir: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(next(bench_dir.rglob("*.parquet")), columns=["id", "answer"]).to_pylist()
    return {r["id"]: r["answer"] for r in rows}


def _cfg(bench_dir: Path, out: Path, **kw) -> BenchmarkConfig:
    raw = {
        "datasets": [
            {
                "name": "magnifierbench",
                "data_path": str(bench_dir),
                "prompt": "Answer directly.",
                "api_key": ["You GPT-4 API"],
            }
        ],
        "models": [{"name": "otterhd", "model_path": "/nonexistent/fake"}],
        "output_dir": str(out),
        "num_actors": 1,
        "cpus_per_actor": 0.5,
        "batch_size": 2,
    }
    raw.update(kw)
    return BenchmarkConfig.model_validate(raw)


def _judge_answer(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    response = re.search(r"Model Response: (.*)\n", prompt).group(1)
    truth = re.search(r"Ground Truth: (.*)\n", prompt).group(1)
    return "Yes." if response.strip().lower() == truth.strip().lower() else "no"


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.timeout(120)
def test_rule_judge_crash_then_resume(local_ray, bench_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    answers = _answers(bench_dir)
    expected = sum(1 for a in answers.values() if a == "A")
    cfg = _cfg(bench_dir, tmp_path / "out", num_actors=1)

    first = run_evaluation(cfg, predictor_cls=CrashingPredictor, print_report=False)["runs"][0]
    assert "simulated actor failure" in first["prediction_error"]
    done_first = first["counts"]["evaluated"]
    assert done_first < len(answers) and first["counts"]["failed"] == len(answers) - done_first
    run_dir = Path(first["results_path"]).parent
    kept = [json.loads(line) for line in (run_dir / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(kept) == done_first  # every finished item is on disk

    second = run_evaluation(cfg, predictor_cls=FakePredictor, print_report=False)["runs"][0]
    c, t = second["counts"], second["timing"]
    assert t["resumed"] == done_first and t["predicted_this_run"] == len(answers) - done_first
    assert c["evaluated"] == len(answers) and c["failed"] == 0 and not second["prediction_error"]
    assert c["mc_correct"] == expected and second["mc_accuracy"] == pytest.approx(expected / len(answers))
    assert second["judge"]["kind"] == "rule" and c["judged"] == len(answers) and c["ff_correct"] == expected
    results = [json.loads(line) for line in Path(second["results_path"]).read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(answers)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "rule" in report and "no API key" in report
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["runs"][0]["counts"]["evaluated"] == len(answers)

    # Switching to the seed's parser re-scores the stored answers (nothing is predicted again) and adds the
    # seed-denominator numbers; the parser sees the seed's question, not the model's chat-formatted input.
    legacy = run_evaluation(
        cfg.model_copy(update={"mc_parse": "legacy"}), predictor_cls=FakePredictor, print_report=False
    )["runs"][0]
    assert legacy["timing"]["predicted_this_run"] == 0 and legacy["mc_parse"] == "legacy"
    assert legacy["counts"]["mc_correct"] == expected
    assert legacy["mc_accuracy_seed_denominator"] == pytest.approx(expected / legacy["counts"]["rows"])
    rec = json.loads(Path(legacy["results_path"]).read_text().splitlines()[0])
    mc_question = rec["doc"]["mc_question"]
    assert mc_question.startswith("Answer directly. ") and "Assistant:" not in mc_question
    assert (
        rec["prompts"]["mc"] == mc_question and rec["model_inputs"]["mc"] == f"User: {mc_question} Assistant:"
    )


@pytest.mark.timeout(120)
def test_openai_judge_through_flaky_server(local_ray, bench_dir, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    answers = _answers(bench_dir)
    expected = sum(1 for a in answers.values() if a == "A")
    failures = ["429:0.2", "500", "stall:3", "malformed", "empty_choices", "503", "429:0"]
    with FakeOpenAI(_judge_answer) as server:
        server.script(failures)
        judge = {
            "base_url": server.base_url,
            "timeout": 1.0,
            "backoff_base": 0.01,
            "backoff_max": 2.0,
            "concurrency": 3,
            "max_retries": 8,
        }
        cfg = _cfg(bench_dir, tmp_path / "out", judge=judge)
        run = run_evaluation(cfg, predictor_cls=FakePredictor)["runs"][0]
        c, j = run["counts"], run["judge"]
        assert c["evaluated"] == len(answers) and c["judged"] == len(answers) and c["unjudged"] == 0
        assert c["ff_correct"] == expected
        assert j["kind"] == "openai" and j["retries"] == len(failures)
        assert j["retry_reasons"] == {"429": 2, "500": 1, "503": 1, "timeout": 1, "malformed": 2}
        assert j["requests"] == len(answers) + len(failures) == len(server.requests)
        assert j["prompt_tokens"] == 50 * len(answers) and j["estimated_cost_usd"] > 0
        assert all(
            r["body"]["temperature"] == 0 and r["body"]["model"] == "gpt-4-0613" for r in server.requests
        )
        assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in server.requests)

        # A rerun costs nothing: every verdict comes from the disk cache, no request is sent.
        sent = len(server.requests)
        again = run_evaluation(cfg, predictor_cls=FakePredictor)["runs"][0]
        assert again["judge"]["cache_hits"] == len(answers) and len(server.requests) == sent
        assert again["counts"]["ff_correct"] == expected and again["timing"]["resumed"] == len(answers)

    # The key is in no log record, no printed output and no file written.
    out, err = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def _judge_all(server, script, requests, tmp_path, **cfg_kw):
    server.script(script)
    cfg = JudgeConfig(base_url=server.base_url, timeout=2.0, backoff_base=0.01, max_retries=3, **cfg_kw)
    judge = OpenAIJudge(cfg, SECRET, JudgeCache(tmp_path / "c.jsonl"))

    async def go():
        try:
            return await judge_all(judge, requests)
        finally:
            await judge.aclose()

    return judge, asyncio.run(go())


@pytest.mark.timeout(60)
def test_failed_judgment_is_unjudged_and_key_redacted(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(lambda body: "yes") as server:
        _, (unclear, fine) = _judge_all(
            server,
            ["ok:perhaps"],
            [JudgeRequest(str(i), "q?", "r", "t") for i in range(2)],
            tmp_path,
            concurrency=1,
        )
    assert unclear.verdict is None and unclear.reply == "perhaps"  # neither yes nor no: unjudged, not wrong
    assert fine.verdict is True
    assert len(JudgeCache(tmp_path / "c.jsonl")) == 1  # only the definite verdict is cached


@pytest.mark.timeout(60)
def test_401_stops_the_judging_at_the_first_one(tmp_path, caplog):
    """A bad key cannot heal: one request, one log line naming the cause, every other item 'not judged'."""
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(lambda body: "yes") as server:
        judge, results = _judge_all(
            server,
            ["401echo"],
            [JudgeRequest(str(i), "q?", "r", "t") for i in range(16)],
            tmp_path,
            concurrency=1,
        )
        assert len(server.requests) == 1
    first, rest = results[0], results[1:]
    assert first.verdict is None and first.attempts == 1  # 401: retrying cannot help
    assert "AuthenticationError" in first.error and "401" in first.error
    assert SECRET not in first.error and "[REDACTED]" in first.error
    assert all(r.verdict is None and r.error.startswith("not judged: AuthenticationError") for r in rest)
    assert judge.fatal_error == first.error
    stop_lines = [r for r in caplog.records if "judging stopped" in r.getMessage()]
    assert len(stop_lines) == 1 and not [r for r in caplog.records if "gave up" in r.getMessage()]
    assert SECRET not in caplog.text


@pytest.mark.timeout(300)
def test_debug_model_end_to_end(local_ray, bench_dir, tmp_path, tiny_tokenizer_dir, monkeypatch):
    hf = pytest.importorskip("otterhd_ray.models.fuyu.hf")
    pytest.importorskip("otterhd_ray.data.processor")
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import FuyuForCausalLM

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    import shutil

    import torch

    from otterhd_ray.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = FuyuForCausalLM(config_for_tokenizer(flavour_config("debug"), tok))
    hf.save_hf(model, model_dir)
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, model_dir / f.name)

    cfg = _cfg(
        bench_dir,
        tmp_path / "out",
        num_actors=2,  # a real pool: both actors load the model once and share the batches
        max_new_tokens=4,
        batch_size=3,
        models=[{"name": "otterhd", "model_path": str(model_dir), "resolution": 120}],
    )
    run = run_evaluation(cfg, print_report=False)["runs"][0]
    n = len(_answers(bench_dir))
    assert not run["prediction_error"], run["prediction_error"]
    assert run["counts"]["evaluated"] == n and run["counts"]["failed"] == 0
    assert run["counts"]["judged"] == n and run["mc_accuracy"] is not None
    results = [json.loads(line) for line in Path(run["results_path"]).read_text().splitlines()]
    assert all(r["num_prompt_tokens"] > 0 and 0 < r["num_new_tokens"] <= 2 * 4 for r in results)
    assert run["timing"]["items_per_s"] > 0 and run["timing"]["items_per_generate_s"] > 0


@pytest.mark.timeout(60)
def test_azure_client_against_the_server(tmp_path):
    with FakeOpenAI(lambda body: "Yes") as server:
        endpoint = server.base_url.removesuffix("/v1")
        cfg = JudgeConfig(api_type="azure", base_url=endpoint, api_version="2024-02-01", timeout=5.0)
        judge = OpenAIJudge(cfg, SECRET, JudgeCache(None))

        async def go():
            try:
                return await judge_all(judge, [JudgeRequest("1", "q?", "r", "t")])
            finally:
                await judge.aclose()

        (res,) = asyncio.run(go())
    assert res.verdict is True
    (req,) = server.requests
    assert (
        "/openai/deployments/gpt-4-0613/chat/completions" in req["path"]
        and "api-version=2024-02-01" in req["path"]
    )
    assert req["headers"].get("api-key") == SECRET


def _bench_fixtures(out: Path) -> dict[str, Path]:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_bench_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_bench_fixtures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_bench_fixtures(out)


@pytest.mark.timeout(180)
def test_bad_key_on_ray_keeps_predictions_and_a_rerun_only_judges(local_ray, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fx = _bench_fixtures(tmp_path / "bench")
    with FakeOpenAI(lambda body: "1.0") as server:
        server.script(
            ["401echo"] * 8
        )  # the key is wrong for the first run (up to concurrency requests in flight)
        raw = {
            "datasets": [{"name": "mmvet", "data_path": str(fx["mmvet"])}],
            "models": [{"name": "otterhd", "model_path": "/nonexistent/fake"}],
            "output_dir": str(tmp_path / "out"),
            "judge": {"base_url": server.base_url, "timeout": 2.0, "backoff_base": 0.01},
        }
        cfg = BenchmarkConfig.model_validate(raw)
        first = run_evaluation(cfg, predictor_cls=FakePredictor, print_report=False)["runs"][0]
        assert "AuthenticationError" in first["judge_error"] and first["counts"]["evaluated"] == 4
        assert first["counts"]["unjudged"] == 4 and len(server.requests) <= cfg.judge.concurrency
        assert len([r for r in caplog.records if "judging stopped" in r.getMessage()]) == 1
        assert "judging stopped" in (tmp_path / "out" / "report.md").read_text()
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]["judge_error"]

        server._script.clear()  # the key works now
        second = run_evaluation(cfg, predictor_cls=FakePredictor, print_report=False)["runs"][0]
        assert second["timing"]["predicted_this_run"] == 0 and second["timing"]["resumed"] == 4
        assert not second["judge_error"] and second["counts"]["judged"] == 4
        assert second["scores"]["gpt_eval_score"] == pytest.approx(100.0)


@pytest.mark.timeout(600)
def test_seed_yaml_with_several_datasets_on_the_debug_model(
    local_ray, tmp_path, tiny_tokenizer_dir, monkeypatch
):
    """The seed's YAML shape (`datasets:` of several benchmarks) end to end: debug model, Ray actor pool."""
    import shutil

    import torch

    from otterhd_ray.config import read_yaml
    from otterhd_ray.data.tokenizer import load_tokenizer
    from otterhd_ray.models.fuyu import hf
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import FuyuForCausalLM

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    hf.save_hf(
        FuyuForCausalLM(config_for_tokenizer(flavour_config("debug"), load_tokenizer(tiny_tokenizer_dir))),
        model_dir,
    )
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, model_dir / f.name)
    fx = _bench_fixtures(tmp_path / "bench")
    raw = read_yaml(Path(__file__).resolve().parents[2] / "configs/benchmark/all_benchmarks.yaml")
    names = ["magnifierbench", "mme", "pope", "mathvista"]
    raw["datasets"] = [
        {**d, "data_path": str(fx[d["name"]]), "max_items": 4, "max_new_tokens": 3}
        for d in raw["datasets"]
        if d["name"] in names
    ]
    raw["models"] = [{"name": "otterhd", "model_path": str(model_dir), "resolution": 60}]
    raw.update(output_dir=str(tmp_path / "out"), num_actors=2, batch_size=2, device="cpu", gpus_per_actor=0)
    metrics = run_evaluation(BenchmarkConfig.model_validate(raw), print_report=False)
    assert [r["benchmark"] for r in metrics["runs"]] == names
    for run in metrics["runs"]:
        assert not run["prediction_error"], run["prediction_error"]
        assert run["counts"]["evaluated"] == 4 and run["counts"]["failed"] == 0, run["dataset"]
        assert all(v is None or isinstance(v, float) for v in run["scores"].values())
    report = (tmp_path / "out" / "report.md").read_text()
    assert all(f"| {n}/" in report for n in names)
    (folder,) = (tmp_path / "out" / "lmms_eval").iterdir()
    tasks = json.loads(next(folder.glob("*_results.json")).read_text())["results"]
    assert set(tasks) == {"magnifierbench", "mme", "pope", "mathvista_testmini"}
