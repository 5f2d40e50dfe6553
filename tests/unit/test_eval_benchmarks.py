"""Every benchmark on its generated fixture (scripts/make_bench_fixtures.py): loading in the HF layout, prompts,
parsing, and each official metric against values computed by hand for given predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from otterhd_ray.eval.benchmarks import ScoreContext, benchmark_names, get_benchmark, score_predictions
from otterhd_ray.eval.benchmarks.mathvista import normalize_extraction, quick_extraction
from otterhd_ray.eval.benchmarks.mme import parse_yes_no_mme
from otterhd_ray.eval.benchmarks.mmvet import grading_prompt, parse_grade, rule_grade
from otterhd_ray.eval.benchmarks.pope import parse_pope
from otterhd_ray.eval.config import BenchDatasetSpec
from otterhd_ray.eval.judge import RuleJudge

REPO = Path(__file__).resolve().parents[2]
ALL = ["magnifierbench", "mathvista", "mmbench", "mme", "mmvet", "pope", "scienceqa", "seedbench"]


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_bench_fixtures", REPO / "scripts/make_bench_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return _script().make_bench_fixtures(tmp_path_factory.mktemp("bench"))


def _run(fixtures, name, responses, mc_parse="strict", judge=None, **spec_kw):
    bench = get_benchmark(name)(BenchDatasetSpec(name=name, data_path=str(fixtures[name]), **spec_kw))
    loaded = bench.load()
    key = bench.question_keys[0]
    given = {i: ({key: r} if isinstance(r, str) else r) for i, r in responses.items()}
    records, agg = score_predictions(bench, loaded, given, ScoreContext(mc_parse, judge))
    return bench, loaded, {r["id"]: r for r in records}, agg


def test_registry_has_the_seeds_eight():
    assert benchmark_names() == ALL
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        get_benchmark("mmmu")


def test_fixture_script_is_deterministic(tmp_path):
    a, b = _script().make_bench_fixtures(tmp_path / "a"), _script().make_bench_fixtures(tmp_path / "b")
    for name in ALL:
        for fa in sorted(a[name].rglob("*.parquet")):
            fb = b[name] / fa.relative_to(a[name])
            assert fa.read_bytes() == fb.read_bytes(), fa


def test_fixtures_use_hf_image_structs(fixtures):
    import pyarrow.parquet as pq

    table = pq.read_table(next(fixtures["mme"].rglob("*.parquet")))
    assert str(table.schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {
        "_type": "Image"
    }


def test_defaults_come_from_the_benchmark():
    assert BenchDatasetSpec(name="mme").data_path == "lmms-lab/MME"
    spec = BenchDatasetSpec(name="mmbench")
    assert (spec.data_path, spec.split, spec.config) == ("lmms-lab/MMBench", "dev", "en")
    assert BenchDatasetSpec(name="mathvista").split == "testmini"
    assert BenchDatasetSpec(name="scienceqa").config == "ScienceQA-IMG"


# ------------------------------------------------------------------------------------------- MME
def test_mme_parser_is_the_official_one():
    assert parse_yes_no_mme("Yes.") == "yes" and parse_yes_no_mme(" no ") == "no"
    assert parse_yes_no_mme("yes, there is") == "yes" and parse_yes_no_mme("No, it is not") == "no"
    assert parse_yes_no_mme("I think so") == "other" and parse_yes_no_mme("The answer is yes") == "other"


def test_mme_scores_by_hand(fixtures):
    bench, loaded, recs, agg = _run(
        fixtures,
        "mme",
        {
            "e/1.png#0": "Yes", "e/1.png#1": "No.",  # existence image 1: both right
            "e/2.png#0": "yes, there is", "e/2.png#1": "Yes",  # image 2: one right
            "c/1.png#0": "I think so", "c/1.png#1": "no",  # count: other + right
            "code/1.png#0": "Yes", "code/1.png#1": "No",  # code_reasoning: both right
        },
    )  # fmt: skip
    prompt = loaded.items[0].prompts["answer"]
    assert "Please answer yes or no" not in prompt
    assert prompt.endswith("?\nAnswer the question using a single word or phrase.")
    sub = agg.breakdown["subtasks"]
    assert (sub["existence"]["acc"], sub["existence"]["acc_plus"], sub["existence"]["score"]) == (
        75.0,
        50.0,
        125.0,
    )
    assert (sub["count"]["acc"], sub["count"]["acc_plus"]) == (50.0, 0.0) and sub["count"]["other"] == 1
    assert sub["code_reasoning"]["score"] == 200.0
    assert agg.scores == {"mme_perception_score": 175.0, "mme_cognition_score": 200.0}


# ------------------------------------------------------------------------------------------ POPE
def test_pope_parser_is_the_official_one():
    assert parse_pope("Yes.") == "yes" and parse_pope("No, there is not.") == "no"
    assert parse_pope("There is no object.") == "no" and parse_pope("Nope") == "yes"
    assert parse_pope("It is not there") == "no" and parse_pope("") == "yes"


def test_pope_scores_by_hand(fixtures):
    # ground truth per category: yes, yes, no, no (ids 0-3 adversarial, 4-7 popular, 8-11 random)
    preds = (
        ["Yes.", "No, there is not.", "No", "There is no object."] + ["Yes"] * 4 + ["yes", "yes", "yes", "no"]
    )
    _, _, _, agg = _run(fixtures, "pope", {str(i): p for i, p in enumerate(preds)})
    adv, pop, rnd = (agg.breakdown["categories"][c] for c in ("adversarial", "popular", "random"))
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.75, 1.0, 0.5, 0.25)
    assert adv["f1"] == pytest.approx(2 / 3)
    assert (pop["accuracy"], pop["precision"], pop["recall"], pop["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert (rnd["accuracy"], rnd["recall"], rnd["yes_ratio"]) == (0.75, 1.0, 0.75) and rnd[
        "f1"
    ] == pytest.approx(0.8)
    # pooled: TP 5, FP 3, TN 3, FN 1
    assert agg.scores["pope_accuracy"] == pytest.approx(8 / 12)
    assert agg.scores["pope_precision"] == pytest.approx(5 / 8) and agg.scores[
        "pope_recall"
    ] == pytest.approx(5 / 6)
    assert agg.scores["pope_f1_score"] == pytest.approx(5 / 7) and agg.scores[
        "pope_yes_ratio"
    ] == pytest.approx(8 / 12)


# --------------------------------------------------------------------------------------- MMBench
MMB_PREDS = {
    "0": "A",
    "1000000": "D. red",
    "2000000": "The answer is C",
    "1": "B",
    "1000001": "B",
    "2": "a man",
}


def test_mmbench_prompt_and_circular_by_hand(fixtures):
    _, loaded, recs, agg = _run(fixtures, "mmbench", MMB_PREDS)
    q1 = next(it for it in loaded.items if it.id == "1")
    assert q1.prompts["answer"] == (
        "Look at the outline. Which shape is shown? There are several options:\nA. circle\nB. square\n"
        "C. triangle\n\nAnswer with the option's letter from the given choices directly."
    )  # D is empty ("nan"): not offered
    assert recs["2"]["pred"] is None and recs["1000000"]["pred"] == "D"
    assert agg.scores["gpt_eval_score"] == pytest.approx(100 / 3)  # only question 0 has every copy right
    cats = agg.breakdown["categories"]
    assert (cats["color"]["correct"], cats["shape"]["correct"], cats["count"]["correct"]) == (1, 0, 0)
    _, _, _, per_row = _run(fixtures, "mmbench", MMB_PREDS, circular=False)
    assert per_row.scores["gpt_eval_score"] == pytest.approx(100 * 4 / 6)


def test_mc_benchmarks_use_the_legacy_parser_when_asked(fixtures):
    # "a man" is no answer for the strict parser; the seed's parser finds a letter in it ("A" in upper case)
    _, _, recs, _ = _run(fixtures, "mmbench", MMB_PREDS, mc_parse="legacy")
    assert recs["2"]["pred"] == "A" and recs["2"]["mc_parse"] == "legacy"


# ---------------------------------------------------------------------------- SEED-Bench, ScienceQA
def test_seedbench_image_part_by_hand(fixtures):
    _, loaded, _, agg = _run(fixtures, "seedbench", {"q0": "A", "q1": "(B)", "q2": "third 2", "q3": "A"})
    assert dict(loaded.skipped) == {"video_question": 1} and len(loaded.items) == 4
    assert loaded.items[0].prompts["answer"].startswith("Question number 0?\nA. first 0\nB. second 0\n")
    assert agg.scores == {"seed_image": 0.75}
    types = agg.breakdown["question_types"]
    assert types["Scene Understanding"]["accuracy"] == 1.0 and types["Text Understanding"]["accuracy"] == 0.0


def test_scienceqa_img_by_hand(fixtures):
    _, loaded, _, agg = _run(
        fixtures, "scienceqa", {"test-0": "A", "test-1": "B.", "test-2": "C", "test-3": "The answer is B."}
    )
    assert dict(loaded.skipped) == {"no_image": 1}
    assert (
        loaded.items[1]
        .prompts["answer"]
        .startswith("Context: Read the words.\nWhich word is a noun?\nA. run\n")
    )
    assert not loaded.items[0].prompts["answer"].startswith("Context")  # no hint, no context line
    assert agg.scores == {"exact_match": 0.75}
    subjects = agg.breakdown["subjects"]
    assert subjects["natural science"]["correct"] == 2 and subjects["social science"]["correct"] == 0


# -------------------------------------------------------------------------------------- MathVista
def test_mathvista_rules_and_normalisation():
    mc = {
        "question_type": "multi_choice",
        "answer_type": "text",
        "choices": ["3/11", "8/11"],
        "precision": None,
    }
    assert quick_extraction("8/11", mc, False) == "8/11" and quick_extraction("", mc, False) == ""
    assert quick_extraction("It is B", mc, False) is None
    assert quick_extraction('The answer is "B".', mc, True) == "B"
    assert normalize_extraction("B", mc) == "8/11" and normalize_extraction("(A) 3/11", mc) == "3/11"
    assert normalize_extraction("8/12", mc) == "8/11"  # nearest choice by edit distance
    flt = {"question_type": "free_form", "answer_type": "float", "choices": [], "precision": 2}
    assert normalize_extraction("1.454", flt) == "1.45" and normalize_extraction("abc", flt) is None
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": None}
    assert quick_extraction("14", integer, False) == "14" and normalize_extraction("14.0", integer) == "14"


def test_mathvista_rule_judge_by_hand(fixtures):
    # No judge key: rules first (pid 2), then the rule judge (letter / last number); pid 5 is not extractable.
    preds = {"1": "B", "2": "14", "3": "about 0.6", "4": "it costs 1.5", "5": "between the years"}
    _, _, recs, agg = _run(fixtures, "mathvista", preds, judge=RuleJudge())
    assert recs["2"]["extraction_by"] == "rules" and recs["3"]["extraction_by"] == "rule judge"
    assert recs["5"]["judged"] is False and recs["4"]["prediction"] == "1.5"
    assert agg.scores["gpt_eval_score"] == pytest.approx(75.0)  # 3 of the 4 judged
    assert agg.breakdown["skills"]["arithmetic reasoning"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}


# ----------------------------------------------------------------------------------------- MM-Vet
def test_mmvet_prompt_parse_and_rule():
    prompt = grading_prompt("What is x?", "-1<AND>-5", "x = -1")
    assert prompt.startswith("Compare the ground truth and prediction from AI models")
    assert prompt.endswith("\nWhat is x? | -1 <AND> -5 | x = -1 | ")
    assert parse_grade("0.5") == 0.5 and parse_grade("1.0 because") == 1.0
    assert parse_grade("1.5") is None and parse_grade("high") is None
    assert rule_grade("red<OR>crimson", "It is crimson.") == 1.0 and rule_grade("-1<AND>-5", "x = -1") == 0.0


def test_mmvet_rule_judge_totals_by_hand(fixtures):
    preds = {"v1": "x = -1 or x = -5", "v2": "a red car", "v3": "YIELD", "v4": "a red square"}
    _, loaded, _, agg = _run(fixtures, "mmvet", preds, judge=RuleJudge())
    assert loaded.items[0].prompts["answer"] == "What is x in the equation?" and loaded.items[0].doc[
        "capabilities"
    ] == ["math", "ocr"]
    assert agg.scores["gpt_eval_score"] == pytest.approx(50.0)  # v1, v2 right; v3, v4 wrong
    caps = agg.breakdown["capabilities"]
    assert caps["ocr"]["score"] == 50.0 and caps["rec"]["score"] == 50.0 and caps["gen"]["score"] == 0.0


def test_magnifierbench_through_the_registry(fixtures):
    bench = get_benchmark("magnifierbench")(BenchDatasetSpec(data_path=str(fixtures["magnifierbench"])))
    loaded = bench.load()
    given = {it.id: {"mc": "A", "ff": it.doc["options"]["A"]} for it in loaded.items}
    _, agg = score_predictions(bench, loaded, given, ScoreContext("strict", RuleJudge()))
    expected = sum(1 for it in loaded.items if it.doc["answer"] == "A") / len(loaded.items)
    assert agg.extra["mc_accuracy"] == pytest.approx(expected) and agg.extra["ff_accuracy"] == pytest.approx(
        expected
    )
