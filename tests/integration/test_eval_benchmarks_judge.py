"""MathVista and MM-Vet against the hostile OpenAI-compatible server (fake_openai.py), the fatal judge stop
through `otterhd evaluate --predictions`, and the lmms-eval files. No Ray: predictions are given."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from otterhd_ray.eval.benchmarks.mathvista import EXTRACTION_DEMO
from otterhd_ray.eval.benchmarks.mmvet import GRADER_PROMPT, RETRY_SUFFIX
from otterhd_ray.evaluate import main

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-test-SECRET-0123456789abcdef"
MATHVISTA = {
    "1": "The correct answer is (B) 8/11.",  # judge extracts B -> 8/11, right
    "2": "14",  # integer: the official rule takes it, no judge request
    "3": "The ratio is 0.6",  # judge: 0.6, right
    "4": "It costs $1.5",  # judge: 1.5 != 1.45, wrong
    "5": "between 2007 and 2008",  # judge: [2007, 2008], right
}
MMVET = {"v1": "x = -1", "v2": "red", "v3": "STOP sign", "v4": "a square"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("mbf", REPO / "scripts/make_bench_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_bench_fixtures(tmp_path_factory.mktemp("bench"))


def _extract(body: dict) -> str:
    test_part = body["messages"][-1]["content"].split(EXTRACTION_DEMO, 1)[1]
    for needle, answer in (("(B) 8/11", "B"), ("0.6", "0.6"), ("$1.5", "1.5"), ("2007", "[2007, 2008]")):
        if needle in test_part:
            return answer
    raise AssertionError(f"unexpected extraction request {test_part!r}")


def _grade(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    assert prompt.startswith(GRADER_PROMPT)
    row = prompt[len(GRADER_PROMPT) :]
    if "What is x" in row:
        return "0.5"
    if "colour" in row:
        return "1.0"
    if "sign" in row:  # unreadable at first; the rephrased retry gets a score
        return "0.0" if prompt.endswith(RETRY_SUFFIX) else "Correctness: high"
    return "great"  # never a score: unjudged after five tries


def _answer(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return _extract(body) if content.startswith(EXTRACTION_DEMO[:40]) else _grade(body)


def _config(tmp_path: Path, fixtures, base_url: str, **judge) -> Path:
    cfg = {
        "datasets": [
            {"name": "mathvista", "data_path": str(fixtures["mathvista"])},
            {"name": "mmvet", "data_path": str(fixtures["mmvet"])},
        ],
        "output_dir": str(tmp_path / "out"),
        "judge": {"base_url": base_url, "timeout": 1.0, "backoff_base": 0.01, "max_retries": 6, **judge},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _predictions(tmp_path: Path) -> Path:
    path = tmp_path / "preds.jsonl"
    lines = [{"id": i, "benchmark": "mathvista", "response": r} for i, r in MATHVISTA.items()]
    lines += [{"id": i, "benchmark": "mmvet", "responses": {"answer": r}} for i, r in MMVET.items()]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.timeout(120)
def test_mathvista_and_mmvet_through_the_hostile_server(fixtures, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(_answer) as server:
        server.script(["429:0.1", "500", "malformed", "stall:2", "empty_choices"])
        cfg = _config(tmp_path, fixtures, server.base_url, concurrency=2)
        assert main(["--predictions", str(_predictions(tmp_path)), "--config", str(cfg)]) == 0
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        mv, vet = metrics["runs"]
        assert mv["scores"]["gpt_eval_score"] == pytest.approx(80.0)  # 4 of 5
        assert mv["counts"]["judged"] == 5 and mv["counts"]["unjudged"] == 0
        assert mv["breakdown"]["skills"]["arithmetic reasoning"]["correct"] == 2
        assert vet["scores"]["gpt_eval_score"] == pytest.approx(50.0)  # (0.5 + 1.0 + 0.0) / 3 judged
        assert vet["counts"]["unjudged"] == 1 and vet["breakdown"]["capabilities"]["ocr"]["score"] == 25.0
        retries = mv["judge"]["retries"] + vet["judge"]["retries"]
        assert retries == 5 and mv["judge"]["kind"] == "openai"
        extraction = [
            r for r in server.requests if r["action"] == "ok" and "Extracted answer" in str(r["body"])
        ]
        assert len(extraction) == 4 and all(r["body"]["max_tokens"] == 256 for r in extraction)
        grades = [
            r["body"]
            for r in server.requests
            if r["action"] == "ok"
            and r["body"]
            and r["body"]["messages"][-1]["content"].startswith(GRADER_PROMPT)
        ]
        v4 = [b for b in grades if "Explain the scene" in b["messages"][-1]["content"]]
        assert [b["temperature"] for b in v4] == [0.0, 0.5, 1.0, 1.5, 2.0]  # the official five tries
        assert all(b["max_tokens"] == 3 and len(b["messages"]) == 1 for b in grades)

        # A rerun is answered from the cache; unreadable replies are never cached, so v3's first question
        # is asked again (its rephrased retry then hits the cache) and v4's five tries are made again.
        sent = len(server.requests)
        assert main(["--predictions", str(_predictions(tmp_path)), "--config", str(cfg)]) == 0
        assert len(server.requests) - sent == 1 + 5
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| predictions:preds.jsonl | mathvista/testmini | acc 80.0% |" in report


@pytest.mark.timeout(120)
def test_bad_key_stops_at_the_first_401_and_a_rerun_only_judges(fixtures, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI(_answer) as server:
        server.script(["401echo"])
        cfg = _config(tmp_path, fixtures, server.base_url, concurrency=1)
        preds = _predictions(tmp_path)
        assert main(["--predictions", str(preds), "--config", str(cfg)]) == 3
        assert len(server.requests) == 1  # the second dataset's judge knows the key failed: it sends nothing
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        mv = metrics["runs"][0]
        assert "AuthenticationError" in mv["judge_error"] and "401" in mv["judge_error"]
        assert mv["counts"]["unjudged"] == 4 and mv["counts"]["judged"] == 1  # pid 2 needs no judge
        report = (tmp_path / "out" / "report.md").read_text()
        assert "judging stopped" in report and "AuthenticationError" in report
        stops = [r for r in caplog.records if "judging stopped" in r.getMessage()]
        assert len(stops) == 1 and not [r for r in caplog.records if "gave up" in r.getMessage()]
        assert main(["--predictions", str(preds), "--config", str(cfg)]) == 0  # the server now answers
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]["counts"]["judged"] == 5
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in caplog.text


def test_lmms_eval_files(fixtures, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "response": "yes"}) + "\n" for i in range(12)))
    args = ["--predictions", str(preds), "--benchmark", "pope", "--data-path", str(fixtures["pope"])]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    (folder,) = (tmp_path / "out" / "lmms_eval").iterdir()
    assert folder.name == f"{tmp_path.name}__p.jsonl"  # the "model" is the predictions file: last 2 parts
    (results,) = folder.glob("*_results.json")
    (samples,) = folder.glob("*_samples_pope.jsonl")
    assert results.name[:15] == samples.name[:15]  # the same YYYYMMDD_HHMMSS prefix
    doc = json.loads(results.read_text())
    for key in (
        "results",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
        "config",
        "git_hash",
        "date",
        "model_name",
        "total_evaluation_time_seconds",
    ):
        assert key in doc, key
    res = doc["results"]["pope"]
    assert res["alias"] == "pope" and res["pope_accuracy,none"] == 0.5 and res["pope_yes_ratio,none"] == 1.0
    assert res["pope_f1_score_stderr,none"] == "N/A" and doc["n-samples"]["pope"] == {
        "original": 12,
        "effective": 12,
    }
    assert (
        doc["configs"]["pope"]["test_split"] == "test"
        and doc["higher_is_better"]["pope"]["pope_recall"] is True
    )
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [x["doc_id"] for x in lines] == list(range(12))
    first = lines[0]
    assert first["target"] == "yes" and first["filtered_resps"] == ["yes"] and "resps" not in first
    assert (
        first["input"].endswith("\nAnswer the question using a single word or phrase.") and first["doc_hash"]
    )
    assert first["pope_accuracy"]["score"] is True


def test_bad_predictions_are_one_line_errors(fixtures, tmp_path, capsys):
    base = ["--benchmark", "pope", "--data-path", str(fixtures["pope"]), "--output-dir", str(tmp_path / "o")]
    cases = {
        "not json\n": "p.jsonl:1: not a JSON object",
        '{"response": "yes"}\n': "needs an 'id'",
        '{"id": "1", "response": "yes"}\n{"id": "1", "response": "no"}\n': "p.jsonl:2: a second record for id '1'",
        '{"id": "1", "text": "yes"}\n': "no answer; expected 'response'",
    }
    for text, message in cases.items():
        (tmp_path / "p.jsonl").write_text(text)
        assert main(["--predictions", str(tmp_path / "p.jsonl"), *base]) == 2
        assert message in capsys.readouterr().err
    assert main(["--predictions", str(tmp_path / "missing.jsonl"), *base]) == 2
    assert main(["--predictions", str(tmp_path / "p.jsonl")]) == 2  # neither --config nor --benchmark
    assert "--config is required" in capsys.readouterr().err
