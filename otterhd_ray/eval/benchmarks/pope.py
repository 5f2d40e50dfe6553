"""POPE (lmms-lab/POPE, test, 9,000 questions): object-hallucination yes/no questions in three categories.

Columns: id, question_id, question, answer (yes/no), image_source, image, category (adversarial / popular /
random). The "Full" config's splits are the categories themselves: then the split name is the category.

Prompt (lmms-eval's default): the question + "\\nAnswer the question using a single word or phrase.".
Parse (the official `LLaVA/llava/eval/eval_pope.py`): the text before the first ".", commas dropped; "No",
"not" or "no" among its words -> no, else yes.
Metric (official): with "yes" as the positive class, accuracy, precision, recall, F1 and yes-ratio (the share
of *predicted* yes) per category, and the same pooled over all categories (what results.json reports).
lmms-eval's own variant matches the reply exactly and takes the ground-truth yes share as yes-ratio; we follow
the official script.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import Aggregate, Benchmark, Item, LoadResult, ScoreContext, pct, ratio

CATEGORIES = ("adversarial", "popular", "random")


def parse_pope(reply: str) -> str:
    """The official POPE answer rule: 'yes' or 'no' (never unparsed)."""
    text = reply.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def binary_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, yes-ratio with yes positive (None where a denominator is 0)."""
    tp = sum(1 for r in records if r["pred"] == "yes" and r["doc"]["answer"] == "yes")
    fp = sum(1 for r in records if r["pred"] == "yes" and r["doc"]["answer"] == "no")
    tn = sum(1 for r in records if r["pred"] == "no" and r["doc"]["answer"] == "no")
    fn = sum(1 for r in records if r["pred"] == "no" and r["doc"]["answer"] == "yes")
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": ratio(tp + tn, len(records)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": ratio(tp + fp, len(records)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "total": len(records),
    }


@register
class POPE(Benchmark):
    name = "pope"
    task = "pope"
    hub_id = "lmms-lab/POPE"
    default_split = "test"
    post_prompt = "\nAnswer the question using a single word or phrase."
    metric_names = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
    default_max_new_tokens = 16

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        category = str(row.get("category") or self.spec.split)
        raw_id = row.get("id")
        item_id = str(raw_id) if raw_id is not None else f"{category}/{row.get('question_id')}"
        answer = str(row.get("answer") or "").strip().lower()
        if answer not in ("yes", "no"):
            result.skip("answer_not_yes_no", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        question = str(row.get("question") or "").strip()
        doc = {"question_id": str(row.get("question_id")), "category": category, "answer": answer}
        return Item(item_id, image, {"answer": self.wrap(question)}, answer, doc)

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        pred = parse_pope(responses.get("answer", ""))
        return {"pred": pred, "correct": pred == item.doc["answer"]}

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        categories = sorted({r["doc"]["category"] for r in records}, key=lambda c: (c not in CATEGORIES, c))
        per_category = {
            c: binary_metrics([r for r in records if r["doc"]["category"] == c]) for c in categories
        }
        overall = binary_metrics(records)
        scores = {
            "pope_accuracy": overall["accuracy"],
            "pope_precision": overall["precision"],
            "pope_recall": overall["recall"],
            "pope_f1_score": overall["f1"],
            "pope_yes_ratio": overall["yes_ratio"],
        }
        head = [("acc", pct(overall["accuracy"])), ("F1", pct(overall["f1"]))]
        head += [(f"{c} F1", pct(m["f1"])) for c, m in per_category.items()]
        return Aggregate(scores, head, breakdown={"categories": per_category, "overall": overall})

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        value = {
            "question_id": doc["question_id"],
            "score": record["correct"],
            "prediction": record["pred"],
            "ground_truth": doc["answer"],
        }
        return dict.fromkeys(self.metric_names, value)
