"""MMBench (lmms-lab/MMBench, config en, split dev, 4,329 rows): single-answer multiple choice.

Columns: index, question, hint, answer (letter), A-D (missing options are empty / NaN), category, image,
source, L2-category, comment, split. Rows with index >= 1,000,000 are circular copies of question
index % 1,000,000 with the options rotated.

Prompt (lmms-eval): "{hint} {question} There are several options:\\nA. ...\\n" (no hint: the question
alone) + "\\nAnswer with the option's letter from the given choices directly.".
Parse: our strict or the seed's legacy multiple-choice parser (lmms-eval falls back to a GPT matcher or regex
when its rules fail; we count an unparsed reply as wrong).
Metric: accuracy overall and per category; with `circular: true` (default, the official CircularEval) a
question is right only when every copy of it is right. results.json: `gpt_eval_score` = 100 x accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import (
    Aggregate,
    Item,
    LetterChoiceBenchmark,
    LoadResult,
    accuracy_by,
    is_missing,
    options_lines,
    pct,
    ratio,
    unparsed,
)

CIRCULAR_OFFSET = 1_000_000


@register
class MMBench(LetterChoiceBenchmark):
    name = "mmbench"
    task = "mmbench_en_dev"
    hub_id = "lmms-lab/MMBench"
    default_split = "dev"
    default_config = "en"
    metric_names = ("gpt_eval_score",)

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        item_id = str(row.get("index"))
        options = {k: str(row[k]).strip() for k in "ABCD" if not is_missing(row.get(k))}
        answer = str(row.get("answer") or "").strip().upper()
        if len(options) < 2:
            result.skip("fewer_than_two_options", item_id)
            return None
        if answer not in options:
            result.skip("answer_not_an_option", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        question = str(row.get("question") or "").strip()
        hint = row.get("hint")
        head = question if is_missing(hint) else f"{str(hint).strip()} {question}"
        text = f"{head} There are several options:\n{options_lines(options)}\n"
        try:
            group = int(float(item_id)) % CIRCULAR_OFFSET
        except ValueError:
            group = item_id  # a non-numeric index has no circular copies
        doc = {
            "index": item_id,
            "group": str(group),
            "answer": answer,
            "options": options,
            "category": str(row.get("category") or ""),
            "l2_category": str(row.get("L2-category") or ""),
        }
        return Item(item_id, image, {"answer": self.wrap(text)}, answer, doc)

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        units = _circular_units(records) if self.spec.circular else list(records)
        correct = sum(1 for u in units if u["correct"])
        acc = ratio(correct, len(units))
        scores = {"gpt_eval_score": None if acc is None else 100.0 * acc}
        mode = "circular" if self.spec.circular else "per row"
        head = [(f"acc ({mode})", pct(acc))]
        breakdown = {
            "mode": mode,
            "questions": len(units),
            "categories": accuracy_by(units, "category"),
            "l2_categories": accuracy_by(units, "l2_category"),
        }
        counts = {"unparsed": unparsed(records), "questions": len(units)}
        return Aggregate(scores, head, breakdown=breakdown, counts=counts)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        return {
            "gpt_eval_score": {
                "index": doc["index"],
                "prediction": record["pred"],
                "answer": doc["answer"],
                "category": doc["category"],
                "score": record["correct"],
            }
        }


def _circular_units(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One unit per question (index % 1e6): right only when every copy is right; the first copy's doc."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["doc"]["group"], []).append(r)
    return [{"doc": rs[0]["doc"], "correct": all(r["correct"] for r in rs)} for rs in groups.values()]
