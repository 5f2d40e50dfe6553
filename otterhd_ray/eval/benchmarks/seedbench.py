"""SEED-Bench, image part (lmms-lab/SEED-Bench, test; the rows with data_type "image"): four-way choice.

Columns: question, choice_a-d, answer (letter), data_type (image / video), question_id, question_type_id,
image (a list of Image; one for image questions). Video rows are counted as skipped ("video_question").

Prompt (lmms-eval): "{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ..." + "\\nAnswer with the option's letter
from the given choices directly.". Parse: our strict or the seed's legacy parser (lmms-eval compares the first
character of the reply). Metric: accuracy overall and per question type; results.json `seed_image` is the
fraction right (lmms-eval's scale).
"""

from __future__ import annotations

from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import (
    Item,
    LetterChoiceBenchmark,
    LoadResult,
    is_missing,
    options_lines,
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
class SEEDBench(LetterChoiceBenchmark):
    name = "seedbench"
    task = "seedbench"
    hub_id = "lmms-lab/SEED-Bench"
    default_split = "test"
    metric_names = ("seed_image",)
    breakdown = ("question_type", "question_types")
    head_label = "image acc"

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

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        return {"seed_image": {"pred": record["pred"], "answer": doc["answer"], "question_id": record["id"]}}
