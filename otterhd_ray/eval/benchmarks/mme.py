"""MME (lmms-lab/MME, test, 2,374 questions): yes/no questions, two per image.

Columns: question_id (shared by an image's two questions), image, question (ends " Please answer yes or no."),
answer (Yes/No), category (10 perception + 4 cognition subtasks).

Prompt (lmms-eval's default): the question without its " Please answer yes or no." suffix, then
"\\nAnswer the question using a single word or phrase.".
Parse (MME's official `calculation.py`): lower case, strip, drop "."; exactly yes/no, else the first 4
characters contain yes / no, else "other" (wrong).
Metric (official): per subtask acc = 100 x correct / questions and acc+ = 100 x images with both questions
right / images; the subtask score is acc + acc+; perception = sum of the 10 perception subtasks (<= 2000),
cognition = sum of the 4 cognition subtasks (<= 800).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import Aggregate, Benchmark, Item, LoadResult, ScoreContext

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_SUFFIX = " Please answer yes or no."


def parse_yes_no_mme(reply: str) -> str:
    """MME's official parser: 'yes' / 'no' / 'other'."""
    text = reply.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@register
class MME(Benchmark):
    name = "mme"
    task = "mme"
    hub_id = "lmms-lab/MME"
    default_split = "test"
    post_prompt = "\nAnswer the question using a single word or phrase."
    metric_names = ("mme_perception_score", "mme_cognition_score")
    default_max_new_tokens = 16

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._seen: Counter[str] = Counter()

    def load(self) -> LoadResult:
        self._seen = Counter()
        return super().load()

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        qid = str(row.get("question_id"))
        item_id = f"{qid}#{self._seen[qid]}"  # the two questions of an image share question_id
        self._seen[qid] += 1
        category = str(row.get("category") or "")
        if category not in PERCEPTION + COGNITION:
            result.skip("unknown_category", item_id)
            return None
        answer = str(row.get("answer") or "").strip().lower().replace(".", "")
        if answer not in ("yes", "no"):
            result.skip("answer_not_yes_no", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        question = str(row.get("question") or "").removesuffix(_SUFFIX).strip()
        doc = {"question_id": qid, "category": category, "answer": answer}
        return Item(item_id, image, {"answer": self.wrap(question)}, str(row.get("answer")), doc)

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        pred = parse_yes_no_mme(responses.get("answer", ""))
        return {"pred": pred, "correct": pred == item.doc["answer"]}

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        subtasks: dict[str, dict[str, Any]] = {}
        for cat in PERCEPTION + COGNITION:
            recs = [r for r in records if r["doc"]["category"] == cat]
            if not recs:
                continue
            images: dict[str, list[bool]] = {}
            for r in recs:
                images.setdefault(r["doc"]["question_id"], []).append(bool(r["correct"]))
            acc = 100.0 * sum(r["correct"] for r in recs) / len(recs)
            acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
            subtasks[cat] = {
                "acc": acc,
                "acc_plus": acc_plus,
                "score": acc + acc_plus,
                "questions": len(recs),
                "images": len(images),
                "other": sum(1 for r in recs if r["pred"] == "other"),
            }
        perception = [subtasks[c]["score"] for c in PERCEPTION if c in subtasks]
        cognition = [subtasks[c]["score"] for c in COGNITION if c in subtasks]
        scores = {
            "mme_perception_score": sum(perception) if perception else None,
            "mme_cognition_score": sum(cognition) if cognition else None,
        }
        head = [
            ("perception", _total(scores["mme_perception_score"], len(perception), 10, 2000)),
            ("cognition", _total(scores["mme_cognition_score"], len(cognition), 4, 800)),
        ]
        counts = {"other": sum(s["other"] for s in subtasks.values())}
        return Aggregate(scores, head, breakdown={"subtasks": subtasks}, counts=counts)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        metric = "mme_perception_score" if doc["category"] in PERCEPTION else "mme_cognition_score"
        return {
            metric: {
                "question_id": doc["question_id"],
                "category": doc["category"],
                "score": record["correct"],
            }
        }


def _total(value: float | None, present: int, expected: int, best: int) -> str:
    if value is None:
        return "n/a"
    partial = "" if present == expected else f", {present}/{expected} subtasks"
    return f"{value:.1f} / {best}{partial}"
