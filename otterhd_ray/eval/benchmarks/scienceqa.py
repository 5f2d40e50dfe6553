"""ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG, split test, 2,017 questions with an image).

Columns: image, question, choices (list), answer (index into choices), hint, task, grade, subject, topic,
category, skill, lecture, solution. Rows without an image are counted as skipped.

Prompt (lmms-eval's default): "Context: {hint}\\n" (when there is a hint) + question + "\\nA. ...\\nB. ..." +
"\\nAnswer with the option's letter from the given choices directly.". Parse: our strict or the seed's legacy
parser (lmms-eval: the reply equals the letter or starts with "X."). Metric: accuracy (results.json
`exact_match`, a fraction as lmms-eval reports it), and per subject.
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


@register
class ScienceQA(LetterChoiceBenchmark):
    name = "scienceqa"
    task = "scienceqa_img"
    hub_id = "lmms-lab/ScienceQA"
    default_split = "test"
    default_config = "ScienceQA-IMG"
    metric_names = ("exact_match",)
    breakdown = ("subject", "subjects")

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        item_id = str(row["id"]) if row.get("id") is not None else f"{self.spec.split}-{result.num_rows - 1}"
        choices = [str(c) for c in (row.get("choices") or [])]
        options = {chr(ord("A") + i): c for i, c in enumerate(choices)}
        try:
            answer = chr(ord("A") + int(row.get("answer")))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            answer = ""
        if len(options) < 2 or answer not in options:
            result.skip("answer_not_an_option" if len(options) >= 2 else "fewer_than_two_options", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        hint = row.get("hint")
        context = "" if is_missing(hint) else f"Context: {str(hint).strip()}\n"
        text = f"{context}{str(row.get('question') or '').strip()}\n{options_lines(options)}"
        doc = {"answer": answer, "options": options, "subject": str(row.get("subject") or "")}
        return Item(item_id, image, {"answer": self.wrap(text)}, answer, doc)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"exact_match": float(bool(record["correct"]))}
