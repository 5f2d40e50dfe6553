"""MM-Vet (lmms-lab/MMVet, test, 218 questions): open answers scored 0-1 by the judge, totals per capability.

Columns: question_id, image, question, answer (alternatives joined by `<AND>` / `<OR>`), image_source,
capability (comma-joined: rec, ocr, know, gen, spat, math).

Prompt: the question as is (the official inference; lmms-eval prepends a think-step-by-step line).
Scoring (the official `mm-vet_evaluator.py`): the judge completes the few-shot table `GRADER_PROMPT` +
"\\n{question} | {answer with spaced <AND>/<OR>} | {prediction} | "; the first word of its reply must be a
float in [0, 1]. An unreadable reply is asked again with "\\nPredict the correctness of the answer (digit): "
appended at temperature +0.5 each time, five tries in all. The official script then scores 0.0; we leave the
item unjudged (reported, never counted as wrong), like every failed judgment.
Without a judge key the rule judge scores 1.0 when the prediction contains every `<AND>` part (or one `<OR>`
alternative) of the answer, else 0.0 - a rough stand-in, named as such in the report.
Metric (official): total = 100 x mean score; per capability = 100 x mean over the items that need it; per
capability combination likewise. results.json `gpt_eval_score` = the total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from otterhd_ray.eval.benchmarks import register
from otterhd_ray.eval.benchmarks.base import Aggregate, Benchmark, Item, LoadResult, ScoreContext
from otterhd_ray.eval.judge import Ask
from otterhd_ray.eval.scoring import normalize_text

# The official few-shot grading prompt (MM-Vet `mm-vet_evaluator.py`), as data.
GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""  # noqa: E501 - the prompt's lines are data
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
NUM_TRIES = 5  # the official evaluator's limit
GRADER_MAX_TOKENS = 3  # the official evaluator's value


def grading_prompt(question: str, answer: str, prediction: str) -> str:
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return GRADER_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def parse_grade(reply: str) -> float | None:
    """The first word as a float in [0, 1], else None (unreadable)."""
    words = reply.strip().split(" ")
    try:
        score = float(words[0].strip())
    except (ValueError, IndexError):
        return None
    return score if 0.0 <= score <= 1.0 else None


def rule_grade(answer: str, prediction: str) -> float:
    pred = normalize_text(prediction)
    if "<OR>" in answer:
        return float(any(normalize_text(a) in pred for a in answer.split("<OR>") if normalize_text(a)))
    parts = [normalize_text(a) for a in answer.split("<AND>") if normalize_text(a)]
    return float(bool(parts) and all(p in pred for p in parts))


@register
class MMVet(Benchmark):
    name = "mmvet"
    task = "mmvet"
    hub_id = "lmms-lab/MMVet"
    default_split = "test"
    uses_judge = True
    metric_names = ("gpt_eval_score",)
    default_max_new_tokens = 512

    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        item_id = str(row.get("question_id"))
        answer = str(row.get("answer") or "")
        if not answer.strip():
            result.skip("no_answer", item_id)
            return None
        image = self.single_image(row, "image", item_id, result)
        if image is None:
            return None
        caps = row.get("capability") or []
        caps = [c.strip() for c in (caps.split(",") if isinstance(caps, str) else caps) if str(c).strip()]
        question = str(row.get("question") or "").strip()
        doc = {"question": question, "answer": answer, "capabilities": sorted(set(caps))}
        return Item(item_id, image, {"answer": self.wrap(question)}, answer, doc)

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        doc, prediction = item.doc, responses.get("answer", "").strip()
        if ctx.judge_kind == "rule":
            return {
                "score": rule_grade(doc["answer"], prediction),
                "judged": True,
                "judge_reply": "rule",
                "judge_error": "",
            }
        base = grading_prompt(doc["question"], doc["answer"], prediction)
        res = None
        for attempt in range(NUM_TRIES):
            prompt, temperature = (base, 0.0) if attempt == 0 else (base + RETRY_SUFFIX, 0.5 * attempt)
            ask = Ask(
                item.id,
                prompt,
                None,
                parse_grade,
                max_tokens=GRADER_MAX_TOKENS,
                temperature=temperature,
                unreadable="reply is not a score in [0, 1]",
            )
            res = await ctx.judge.ask(ask)
            if res.value is not None or res.error != ask.unreadable:
                break  # scored, or failed in a way asking again cannot fix
        assert res is not None
        return {
            "score": res.value,
            "judged": res.value is not None,
            "judge_reply": res.reply,
            "judge_error": res.error,
            "judge_tries": attempt + 1,
            "judge_cached": res.cached,
        }

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        judged = [r for r in records if r["judged"]]
        total = 100.0 * sum(r["score"] for r in judged) / len(judged) if judged else None
        caps: dict[str, list[float]] = {}
        combos: dict[str, list[float]] = {}
        for r in judged:
            for c in r["doc"]["capabilities"]:
                caps.setdefault(c, []).append(r["score"])
            combos.setdefault("_".join(r["doc"]["capabilities"]), []).append(r["score"])

        def table(groups: dict[str, list[float]]) -> dict[str, dict[str, float]]:
            return {k: {"score": 100.0 * sum(v) / len(v), "total": len(v)} for k, v in sorted(groups.items())}

        head = [("total", "n/a" if total is None else f"{total:.1f}")]
        head += [(c, f"{v['score']:.1f}") for c, v in table(caps).items()]
        breakdown = {"capabilities": table(caps), "capability_combinations": table(combos)}
        return Aggregate({"gpt_eval_score": total}, head, breakdown=breakdown)

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        doc = record["doc"]
        return {
            "gpt_eval_score": {
                "question_id": record["id"],
                "gt_answer": doc["answer"],
                "capabilities": ",".join(doc["capabilities"]),
                "pred_answer": record["responses"].get("answer", ""),
                "score": record["score"],
            }
        }
