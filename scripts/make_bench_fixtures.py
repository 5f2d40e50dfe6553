"""Write small parquet fixtures in each benchmark's HF layout, generated rather than hand-made.

    python scripts/make_bench_fixtures.py --out DIR

DIR/magnifierbench/data/test-00000-of-00001.parquet   Otter-AI/MagnifierBench (synthetic, `data synth`)
DIR/mme/data/test-00000-of-00001.parquet              lmms-lab/MME
DIR/pope/data/test-00000-of-00001.parquet             lmms-lab/POPE
DIR/mmbench/en/dev-00000-of-00001.parquet             lmms-lab/MMBench (config en), with circular copies
DIR/seedbench/data/test-00000-of-00001.parquet        lmms-lab/SEED-Bench (one video row)
DIR/scienceqa/ScienceQA-IMG/test-00000-of-00001.parquet  lmms-lab/ScienceQA (config ScienceQA-IMG)
DIR/mathvista/data/testmini-00000-of-00001.parquet    AI4Math/MathVista
DIR/mmvet/data/test-00000-of-00001.parquet            lmms-lab/MMVet

Images are HF `Image` cells (struct<bytes: binary, path: string>), the features JSON is in the schema's
`huggingface` metadata as `datasets` writes it. Column names and types follow the datasets' cards; the rows
are few and their answers fixed (`ROWS`), so tests can compute every metric by hand. Deterministic: running
it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_T = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_COLORS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (150, 60, 200), (30, 30, 30)]


def png(seed: int, size: tuple[int, int] = (48, 36)) -> dict[str, Any]:
    """An HF Image cell: a small PNG whose colour depends on `seed`."""
    buf = io.BytesIO()
    Image.new("RGB", size, _COLORS[seed % len(_COLORS)]).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{seed}.png"}


def _mme() -> list[dict[str, Any]]:
    rows = []
    # (question_id, category, [(answer, question)]): two questions per image, as MME has.
    for k, (qid, cat) in enumerate(
        [
            ("e/1.png", "existence"),
            ("e/2.png", "existence"),
            ("c/1.png", "count"),
            ("code/1.png", "code_reasoning"),
        ]
    ):
        for answer in ("Yes", "No"):
            q = f"Is there a thing number {k} ({answer.lower()} case) in the image? Please answer yes or no."
            rows.append(
                {"question_id": qid, "image": png(k), "question": q, "answer": answer, "category": cat}
            )
    return rows


def _pope() -> list[dict[str, Any]]:
    rows = []
    answers = ["yes", "yes", "no", "no"]
    for c, category in enumerate(("adversarial", "popular", "random")):
        for i, answer in enumerate(answers):
            n = c * len(answers) + i
            rows.append(
                {
                    "id": str(n),
                    "question_id": str(i + 1),
                    "question": f"Is there a object{n} in the image?",
                    "answer": answer,
                    "image_source": f"COCO_val2014_{n:012d}",
                    "image": png(n),
                    "category": category,
                }
            )
    return rows


def _mmbench() -> list[dict[str, Any]]:
    base = {"source": "fixture", "comment": None, "split": "dev", "L2-category": "perception"}
    rows = [
        # question 0 and two circular copies (options rotated, answer follows its option)
        {
            "index": 0,
            "question": "What colour is it?",
            "hint": "nan",
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": "yellow",
            "answer": "A",
            "category": "color",
        },
        {
            "index": 1000000,
            "question": "What colour is it?",
            "hint": "nan",
            "A": "green",
            "B": "blue",
            "C": "yellow",
            "D": "red",
            "answer": "D",
            "category": "color",
        },
        {
            "index": 2000000,
            "question": "What colour is it?",
            "hint": "nan",
            "A": "blue",
            "B": "yellow",
            "C": "red",
            "D": "green",
            "answer": "C",
            "category": "color",
        },
        # question 1: three options (D empty), a hint
        {
            "index": 1,
            "question": "Which shape is shown?",
            "hint": "Look at the outline.",
            "A": "circle",
            "B": "square",
            "C": "triangle",
            "D": "nan",
            "answer": "B",
            "category": "shape",
        },
        {
            "index": 1000001,
            "question": "Which shape is shown?",
            "hint": "Look at the outline.",
            "A": "square",
            "B": "triangle",
            "C": "circle",
            "D": "nan",
            "answer": "A",
            "category": "shape",
        },
        # question 2: no copies
        {
            "index": 2,
            "question": "How many objects?",
            "hint": "nan",
            "A": "1",
            "B": "2",
            "C": "3",
            "D": "4",
            "answer": "C",
            "category": "count",
        },
    ]
    return [{**base, **r, "image": png(r["index"] % 7)} for r in rows]


def _seedbench() -> list[dict[str, Any]]:
    rows = []
    spec = [
        ("A", "1", "image"),
        ("B", "1", "image"),
        ("C", "5", "image"),
        ("D", "9", "image"),
        ("A", "10", "video"),
    ]
    for i, (answer, qtype, dtype) in enumerate(spec):
        rows.append(
            {
                "answer": answer,
                "choice_a": f"first {i}",
                "choice_b": f"second {i}",
                "choice_c": f"third {i}",
                "choice_d": f"fourth {i}",
                "data_id": f"d{i}",
                "data_type": dtype,
                "question": f"Question number {i}?",
                "question_id": f"q{i}",
                "question_type_id": int(qtype),
                "image": [png(i)] if dtype == "image" else [],
                "segment": None,
            }
        )
    return rows


def _scienceqa() -> list[dict[str, Any]]:
    common = {
        "task": "closed choice",
        "grade": "grade4",
        "topic": "t",
        "category": "c",
        "skill": "s",
        "lecture": "",
        "solution": "",
    }
    rows = [
        {
            "question": "Which is a mammal?",
            "choices": ["dog", "trout"],
            "answer": 0,
            "hint": "",
            "subject": "natural science",
        },
        {
            "question": "Which word is a noun?",
            "choices": ["run", "table", "quickly"],
            "answer": 1,
            "hint": "Read the words.",
            "subject": "language science",
        },
        {
            "question": "Which state is farthest north?",
            "choices": ["Texas", "Maine", "Ohio", "Utah"],
            "answer": 1,
            "hint": "",
            "subject": "social science",
        },
        {
            "question": "Which is hotter?",
            "choices": ["ice", "fire"],
            "answer": 1,
            "hint": "",
            "subject": "natural science",
        },
    ]
    out = [{**common, **r, "image": png(i)} for i, r in enumerate(rows)]
    out.append(
        {
            **common,
            "question": "No image here?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "subject": "natural science",
            "image": None,
        }
    )
    return out


def _mathvista() -> list[dict[str, Any]]:
    hint = {
        "mc": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
        "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
        "e.g., 1, 2, 3, at the end.",
        "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
        "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
        "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places "
        "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
        "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final "
        "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
    }
    spec = [
        (
            "1",
            "What fraction is blue?",
            ["3/11", "8/11", "6/11", "3/5"],
            None,
            "8/11",
            "multi_choice",
            "text",
            "mc",
            ["arithmetic reasoning"],
        ),
        (
            "2",
            "How many cubes are there?",
            None,
            None,
            "14",
            "free_form",
            "integer",
            "integer",
            ["arithmetic reasoning", "numeric commonsense"],
        ),
        (
            "3",
            "What is the ratio?",
            None,
            1.0,
            "0.6",
            "free_form",
            "float",
            "float1",
            ["statistical reasoning"],
        ),
        (
            "4",
            "How much money is needed?",
            None,
            2.0,
            "1.45",
            "free_form",
            "float",
            "float2",
            ["arithmetic reasoning"],
        ),
        (
            "5",
            "Between which two years is the peak?",
            None,
            None,
            "[2007, 2008]",
            "free_form",
            "list",
            "list",
            ["statistical reasoning"],
        ),
    ]
    rows = []
    for i, (pid, q, choices, precision, answer, qtype, atype, hkey, skills) in enumerate(spec):
        query = f"{hint[hkey]}\nQuestion: {q}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(choices))
        rows.append(
            {
                "pid": pid,
                "question": q,
                "image": f"images/{pid}.jpg",
                "decoded_image": png(i),
                "choices": choices,
                "unit": None,
                "precision": precision,
                "answer": answer,
                "question_type": qtype,
                "answer_type": atype,
                "metadata": {
                    "split": "testmini",
                    "language": "english",
                    "source": "fixture",
                    "category": "math-targeted-vqa",
                    "task": "figure question answering",
                    "context": "synthetic scene",
                    "grade": "elementary school",
                    "skills": skills,
                },
                "query": query,
            }
        )
    return rows


def _mmvet() -> list[dict[str, Any]]:
    spec = [
        ("v1", "What is x in the equation?", "-1<AND>-5", "ocr,math"),
        ("v2", "What colour is the car?", "red<OR>crimson", "rec"),
        ("v3", "What is written on the sign?", "STOP", "ocr"),
        ("v4", "Explain the scene.", "A red square on a plain background.", "rec,gen"),
    ]
    return [
        {
            "question_id": qid,
            "image": png(i),
            "question": q,
            "answer": a,
            "image_source": "fixture",
            "capability": cap,
        }
        for i, (qid, q, a, cap) in enumerate(spec)
    ]


ROWS = {
    "mme": _mme,
    "pope": _pope,
    "mmbench": _mmbench,
    "seedbench": _seedbench,
    "scienceqa": _scienceqa,
    "mathvista": _mathvista,
    "mmvet": _mmvet,
}
FILES = {
    "mme": "mme/data/test-00000-of-00001.parquet",
    "pope": "pope/data/test-00000-of-00001.parquet",
    "mmbench": "mmbench/en/dev-00000-of-00001.parquet",
    "seedbench": "seedbench/data/test-00000-of-00001.parquet",
    "scienceqa": "scienceqa/ScienceQA-IMG/test-00000-of-00001.parquet",
    "mathvista": "mathvista/data/testmini-00000-of-00001.parquet",
    "mmvet": "mmvet/data/test-00000-of-00001.parquet",
}
_IMAGE_COLUMNS = {"seedbench": ("image", True), "mathvista": ("decoded_image", False)}


def _features(table: pa.Table, image_col: str, is_list: bool) -> bytes:
    """The `huggingface` schema metadata `datasets` writes: the features, images as Image."""
    feats: dict[str, Any] = {}
    for f in table.schema:
        if f.name == image_col:
            feats[f.name] = [{"_type": "Image"}] if is_list else {"_type": "Image"}
        else:
            feats[f.name] = (
                {"dtype": str(f.type), "_type": "Value"}
                if not pa.types.is_nested(f.type)
                else {"_type": "Sequence"}
            )
    return json.dumps({"info": {"features": feats}}).encode()


def write_table(
    path: Path, rows: list[dict[str, Any]], image_col: str = "image", is_list: bool = False
) -> Path:
    schema_fields = []
    table = pa.Table.from_pylist(rows)  # infer, then pin the image column to the HF struct type
    for f in table.schema:
        if f.name == image_col:
            schema_fields.append(pa.field(f.name, pa.list_(IMAGE_T) if is_list else IMAGE_T))
        else:
            schema_fields.append(f)
    table = pa.Table.from_pylist(rows, schema=pa.schema(schema_fields))
    table = table.replace_schema_metadata({"huggingface": _features(table, image_col, is_list)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return path


def make_bench_fixtures(out: Path, num_magnifierbench: int = 6, seed: int = 7) -> dict[str, Path]:
    """Write every benchmark's fixture under `out`; returns name -> dataset directory."""
    from otterhd_ray.data.synth import BENCH_FILE, synthesize

    out = Path(out)
    dirs: dict[str, Path] = {}
    for name, rows in ROWS.items():
        image_col, is_list = _IMAGE_COLUMNS.get(name, ("image", False))
        write_table(out / FILES[name], rows(), image_col, is_list)
        dirs[name] = out / name
    scratch = out / ".bench-scratch"
    synthesize(scratch, num_train=0, num_bench=num_magnifierbench, seed=seed)
    (out / BENCH_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch / BENCH_FILE), out / BENCH_FILE)
    shutil.rmtree(scratch)
    dirs["magnifierbench"] = out / "magnifierbench"
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    print(json.dumps({k: str(v) for k, v in make_bench_fixtures(args.out).items()}, indent=2))


if __name__ == "__main__":
    main()
