"""MathVista testmini (AI4Math/MathVista, split testmini, 1,000 problems): judge extraction, normalised match.

Columns: pid, question, image (a path), decoded_image (Image), choices (list or null), unit, precision,
answer (text), question_type (multi_choice / free_form), answer_type (text / integer / float / list),
metadata (struct or, in older copies, its Python repr: split, language, source, category, task, context,
grade, skills), query (the official prompt with its hint).

Prompt: the dataset's `query` (MathVista's own "Hint: ... Question: ... Choices: ..." text).
Scoring (the official `evaluation/extract_answer.py` + `calculate_score.py`):
1. extraction: an empty reply -> ""; a reply that is one of the choices, or an integer / float that parses
   as the answer type, is taken as is; with `quick_extract`, 'The answer is "X".' -> X; otherwise the judge
   is asked with the official 5-shot extraction prompt (`EXTRACTION_DEMO`, test part "{query}\\n\\n{reply}\\n\\n
   Extracted answer: "). Without a judge key the rule judge takes a strict option letter or the last number.
2. normalisation by type: multiple choice -> a letter ("(B)" too) maps to its choice, else the
   Levenshtein-nearest choice; integer -> str(int(float(x))); float -> str(round(float(x), precision));
   list -> str(x). Right iff the normalised prediction equals the answer string.
A failed extraction (judge error) leaves the item unjudged: reported, never counted wrong.
Metric: accuracy over judged items overall, per skill, question type and answer type; results.json
`gpt_eval_score` = 100 x accuracy.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import (
    Aggregate,
    Benchmark,
    Item,
    LoadResult,
    ScoreContext,
    accuracy_by,
    is_missing,
    pct,
    ratio,
)
from otterhd_ray.eval.judge import Ask
from otterhd_ray.eval.scoring import parse_mc_strict

# The official few-shot extraction prompt (MathVista `evaluation/prompts/ext_ans.py`), as data.
EXTRACTION_DEMO = """Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B"""  # noqa: E501 - the prompt's lines are data
EXTRACTION_MAX_TOKENS = 256
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def extraction_prompt(query: str, response: str) -> str:
    return f"{EXTRACTION_DEMO}\n\n{query}\n\n{response}\n\nExtracted answer: "


def parse_extraction(reply: str) -> str | None:
    """The judge's extraction; an empty reply is unreadable (asked again next run, never scored)."""
    text = re.sub(r"^\s*extracted answer\s*:\s*", "", reply, flags=re.I).strip()
    return text or None


def quick_extraction(response: str, doc: Mapping[str, Any], quick_extract: bool) -> str | None:
    """The official rules tried before the judge; None: the judge must extract."""
    if response == "":
        return ""
    if doc["question_type"] == "multi_choice" and response in doc["choices"]:
        return response
    if doc["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if doc["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    if quick_extract:
        m = re.search(r'The answer is "(.*)"\.', response)
        if m:
            return m.group(1)
    return None


def rule_extraction(response: str, doc: Mapping[str, Any]) -> str | None:
    """No judge key: a strict option letter, else the last number in the reply; else not extractable."""
    if doc["question_type"] == "multi_choice":
        letters = {chr(ord("A") + i): c for i, c in enumerate(doc["choices"])}
        return parse_mc_strict(response, letters)
    numbers = _NUMBER_RE.findall(response)
    return numbers[-1] if numbers else None


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_extraction(extraction: str, doc: Mapping[str, Any]) -> str | None:
    """The official normalisation by question / answer type; None when it cannot be read as the type."""
    if doc["question_type"] == "multi_choice":
        choices = doc["choices"]
        text = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if text in options:
            return choices[options.index(text)]
        return min(choices, key=lambda c: levenshtein(text, c))  # first of the nearest, as the official
    try:
        if doc["answer_type"] == "integer":
            return str(int(float(extraction)))
        if doc["answer_type"] == "float":
            return str(round(float(extraction), int(doc["precision"] or 0)))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)


def _metadata(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


@register
class MathVista(Benchmark):
    name = "mathvista"
    task = "mathvista_testmini"
    hub_id = "AI4Math/MathVista"
    default_split = "testmini"
    image_columns = ("decoded_image",)
    uses_judge = True
    metric_names = ("gpt_eval_score",)
    default_max_new_tokens = 512

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        item_id = str(row.get("pid"))
        qtype, atype = str(row.get("question_type") or ""), str(row.get("answer_type") or "")
        choices = [str(c) for c in (row.get("choices") or [])]
        if qtype not in ("multi_choice", "free_form") or (qtype == "multi_choice" and not choices):
            result.skip("bad_question_type", item_id)
            return None
        if is_missing(row.get("answer")) or is_missing(row.get("query")):
            result.skip("no_answer_or_query", item_id)
            return None
        image = self.single_image(row, "decoded_image", item_id, result)
        if image is None:
            return None
        meta = _metadata(row.get("metadata"))
        precision = row.get("precision")
        doc = {
            "query": str(row["query"]),
            "choices": choices,
            "question_type": qtype,
            "answer_type": atype,
            "precision": None if is_missing(precision) else int(float(precision)),
            "answer": str(row["answer"]),
            "skills": [str(s) for s in meta.get("skills") or []],
        }
        return Item(item_id, image, {"answer": self.wrap(doc["query"])}, doc["answer"], doc)

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        response = responses.get("answer", "").strip()
        extraction = quick_extraction(response, item.doc, self.spec.quick_extract)
        out: dict[str, Any] = {"extraction_by": "rules", "judge_reply": "", "judge_error": ""}
        if extraction is None and ctx.judge_kind == "rule":
            extraction = rule_extraction(response, item.doc)
            out["extraction_by"] = "rule judge"
            if extraction is None:
                out["judge_error"] = "rule judge: no option letter or number in the reply"
        elif extraction is None:
            ask = Ask(
                item.id,
                extraction_prompt(item.doc["query"], response),
                None,
                parse_extraction,
                max_tokens=EXTRACTION_MAX_TOKENS,
                unreadable="empty extraction",
            )
            res = await ctx.judge.ask(ask)
            extraction = res.value
            out.update(
                extraction_by="judge", judge_reply=res.reply, judge_error=res.error, judge_cached=res.cached
            )
        if extraction is None:
            return {**out, "extraction": None, "prediction": None, "correct": None, "judged": False}
        prediction = normalize_extraction(extraction, item.doc)
        correct = prediction is not None and prediction == item.doc["answer"]
        return {**out, "extraction": extraction, "prediction": prediction, "correct": correct, "judged": True}

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        judged = [r for r in records if r["judged"]]
        acc = ratio(sum(1 for r in judged if r["correct"]), len(judged))
        breakdown = {
            "skills": accuracy_by(judged, "skills"),
            "question_types": accuracy_by(judged, "question_type"),
            "answer_types": accuracy_by(judged, "answer_type"),
        }
        scores = {"gpt_eval_score": None if acc is None else 100.0 * acc}
        return Aggregate(scores, [("acc", pct(acc))], breakdown=breakdown)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        return {
            "gpt_eval_score": {
                "question_id": record["id"],
                "extraction": record["extraction"],
                "prediction": record["prediction"],
                "answer": doc["answer"],
                "true_false": record["correct"],
                "question_type": doc["question_type"],
                "answer_type": doc["answer_type"],
            }
        }
