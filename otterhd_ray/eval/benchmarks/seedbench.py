"""SEED-Bench, image part (lmms-lab/SEED-Bench, test; the rows with data_type "image"): four-way choice.

Columns: question, choice_a-d, answer (letter), data_type (image / video), question_id, question_type_id,
image (a list of Image; one for image questions). Video rows are counted as skipped ("video_question").

Prompt (lmms-eval): "{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ..." + "\\nAnswer with the option's letter
from the given choices directly.". Parse: our strict or the seed's legacy parser (lmms-eval compares the first
character of the reply). Metric: accuracy overall and per question type; results.json `seed_image` is the
fraction right (lmms-eval's scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import (
    LETTER_SUFFIX,
    Aggregate,
    Benchmark,
    Item,
    LoadResult,
    ScoreContext,
    accuracy_by,
    is_missing,
    options_lines,
    pct,
    ratio,
    score_mc,
)

# SEED-Bench's question types 1-9 are the image ones (10-12 are video).
QUESTION_TYPES = {
    "1": "Scene Understanding",
    "2": "Instance Identity",
    "3": "Instance Attributes",
    "4": "Instance Location",
    "5": "Instances Counting",
    "6": "Spatial Relation",
    "7": "Instance Interaction",
    "8": "Visual Reasoning",
    "9": "Text Understanding",
}


@register
class SEEDBench(Benchmark):
    name = "seedbench"
    task = "seedbench"
    hub_id = "lmms-lab/SEED-Bench"
    default_split = "test"
    post_prompt = LETTER_SUFFIX
    metric_names = ("seed_image",)
    default_max_new_tokens = 16

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        item_id = str(row.get("question_id"))
        if str(row.get("data_type") or "image") != "image":
            result.skip("video_question", item_id)
            return None
        options = {
            k.upper(): str(row[f"choice_{k}"]).strip()
            for k in "abcd"
            if not is_missing(row.get(f"choice_{k}"))
        }
        answer = str(row.get("answer") or "").strip().upper()
        if answer not in options:
            result.skip("answer_not_an_option", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        text = f"{str(row.get('question') or '').strip()}\n{options_lines(options)}"
        qtype = str(row.get("question_type_id"))
        doc = {"answer": answer, "options": options, "question_type": QUESTION_TYPES.get(qtype, qtype)}
        return Item(item_id, image, {"answer": self.wrap(text)}, answer, doc)

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        return score_mc(responses.get("answer", ""), item.doc["options"], item.doc["answer"], ctx.mc_parse)

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        acc = ratio(sum(1 for r in records if r["correct"]), len(records))
        breakdown = {"question_types": accuracy_by(records, "question_type")}
        counts = {"unparsed": sum(1 for r in records if r["pred"] is None)}
        return Aggregate({"seed_image": acc}, [("image acc", pct(acc))], breakdown=breakdown, counts=counts)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        return {"seed_image": {"pred": record["pred"], "answer": doc["answer"], "question_id": record["id"]}}
