"""Write a small fixture of every input format `otterhd data convert` reads, with each edge case.

    python scripts/make_format_fixtures.py --out DIR

Every record's id says what the converter must do with it: `ok-...` is accepted, `bad-<reason>-...` is
rejected with that reason (the tests check exactly this). Records without an id are named in the comments.

DIR/llava/        llava.json (JSON array), llava.jsonl (+ one line that is not JSON), images/ (JPEG, PNG, a 0-byte
                  file, a text file named .jpg, a PNG whose header claims 10^10 pixels)
DIR/sharegpt/     dataset_info.json with `sg_openai` (messages/role/content + system), `sg_classic` (JSONL,
                  conversations/from/value + system column) and `alpaca_demo` (alpaca with history); images/
DIR/hf/           vqa/train-00000-of-00001.parquet (`datasets.Image` column: bytes, path-only, null, 0 bytes),
                  chat.parquet (messages + a list of images)
DIR/cauldron/     vqav2/train-00000-of-00001.parquet (the_cauldron: images + texts)
DIR/broken/       corrupt.parquet (not parquet), wrong_schema.parquet (columns foo, bar), truncated.json
                  (a JSON array cut short)

Deterministic: the same bytes every run.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from otterhd_ray.data.synth import _bomb_png

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "red.jpg").write_bytes(jpeg((200, 30, 30)))
    (folder / "blue.png").write_bytes(png((30, 30, 200)))
    (folder / "green.jpg").write_bytes(jpeg((30, 200, 30), (90, 60)))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not_an_image.jpg").write_bytes(b"hello, this is text\n")
    (folder / "bomb.png").write_bytes(_bomb_png())


def turn(who: str, text: str) -> dict[str, str]:
    return {"from": who, "value": text}


def llava_records() -> list:
    q, a = "What colour is it?", "Red."
    return [
        {"id": "ok-start", "image": "images/red.jpg", "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "ok-end", "image": "images/blue.png", "conversations": [turn("human", f"{q}\n<image>"), turn("gpt", "Blue.")]},
        {"id": "ok-mid", "image": "images/green.jpg",
         "conversations": [turn("human", "Look at <image> and name the colour."), turn("gpt", "Green.")]},
        {"id": "ok-multiturn", "image": "images/red.jpg",
         "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a), turn("human", "Sure?"), turn("gpt", "Yes.")]},
        {"id": "ok-text-only", "model": "", "conversations": [turn("human", "Say hi."), turn("gpt", "Hi.")]},
        {"id": "bad-image_count_mismatch-none", "image": "images/red.jpg",
         "conversations": [turn("human", q), turn("gpt", a)]},
        {"id": "bad-image_count_mismatch-two", "image": "images/red.jpg",
         "conversations": [turn("human", f"<image>\n<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-image_count_mismatch-noimage", "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-multi_image", "image": ["images/red.jpg", "images/blue.png"],
         "conversations": [turn("human", f"<image>\n<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-image_not_found", "image": "images/missing.jpg", "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-empty_image", "image": "images/empty.jpg", "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-undecodable_image", "image": "images/not_an_image.jpg",
         "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-image_too_large", "image": "images/bomb.png", "conversations": [turn("human", f"<image>\n{q}"), turn("gpt", a)]},
        {"id": "bad-bad_turn_order", "conversations": [turn("gpt", "Hello."), turn("human", "Hi?")]},
        {"id": "bad-unanswered_turn", "conversations": [turn("human", "Hi?"), turn("gpt", "Hello."), turn("human", "And?")]},
        {"id": "bad-bad_role", "conversations": [turn("robot", "Hi?"), turn("gpt", "Hello.")]},
        {"id": "bad-missing_text", "conversations": [turn("human", "Hi?"), {"from": "gpt", "value": None}]},
        {"id": "bad-empty_conversation", "conversations": []},
        "not an object",  # record 18: malformed_record (no id)
    ]


def write_llava(root: Path) -> None:
    write_images(root / "images")
    records = llava_records()
    (root / "llava.json").write_text(json.dumps(records, indent=1))
    lines = [json.dumps(r) for r in records[:5]] + ["{this line is not json", json.dumps(records[5])]
    (root / "llava.jsonl").write_text("\n".join(lines) + "\n")  # record 5: bad_json; record 6: mismatch


def write_sharegpt(root: Path) -> None:
    write_images(root / "images")
    info = {
        "sg_openai": {"file_name": "sg_openai.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
        "sg_classic": {"file_name": "sg_classic.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "images": "images", "system": "system"}},
        "alpaca_demo": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                        "response": "output", "history": "history", "images": "images"}},
        "from_hub": {"hf_hub_url": "someone/dataset", "formatting": "sharegpt"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))

    def m(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    openai = [
        {"id": "ok-openai", "messages": [m("user", "<image>Who?"), m("assistant", "Kane.")], "images": ["images/red.jpg"]},
        {"id": "ok-openai-system", "messages": [m("system", "Be brief."), m("user", "Hi <image>"), m("assistant", "Hi.")],
         "images": ["images/blue.png"]},
        {"id": "ok-openai-text", "messages": [m("user", "Two plus two?"), m("assistant", "Four.")]},
        {"id": "bad-image_count_mismatch", "messages": [m("user", "Who?"), m("assistant", "Kane.")],
         "images": ["images/red.jpg"]},
        {"id": "bad-multi_image", "messages": [m("user", "<image><image>Same?"), m("assistant", "No.")],
         "images": ["images/red.jpg", "images/blue.png"]},
        {"id": "bad-bad_role", "messages": [m("user", "Weather?"), m("observation", "{}"), m("assistant", "Sunny.")]},
        {"id": "bad-no_assistant_turn", "messages": [m("user", "Hi?")]},
    ]
    (root / "sg_openai.json").write_text(json.dumps(openai))
    classic = [
        {"id": "ok-classic", "system": "You see images.", "images": ["images/green.jpg"],
         "conversations": [turn("human", "<image>\nColour?"), turn("gpt", "Green.")]},
        {"id": "bad-image_not_found", "images": ["images/nope.jpg"],
         "conversations": [turn("human", "<image>\nColour?"), turn("gpt", "Green.")]},
    ]
    (root / "sg_classic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in classic))
    alpaca = [
        {"id": "ok-alpaca", "instruction": "Describe the image.", "input": "<image>", "output": "A red square.",
         "images": ["images/red.jpg"]},
        {"id": "ok-alpaca-history", "instruction": "And now?", "input": "", "output": "Still blue.",
         "history": [["<image>What colour?", "Blue."]], "images": ["images/blue.png"]},
        {"id": "ok-alpaca-text", "instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"id": "bad-missing_text", "instruction": "", "input": "x", "output": "y"},
        {"id": "bad-image_count_mismatch", "instruction": "Describe.", "input": "", "output": "Red.",
         "images": ["images/red.jpg"]},
    ]
    (root / "alpaca.json").write_text(json.dumps(alpaca))


def _hf_table(rows: list[dict], schema: pa.Schema, features: dict) -> pa.Table:
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.Table.from_pylist(rows, schema.with_metadata(meta))


def write_hf(root: Path) -> None:
    write_images(root / "images")
    red, blue = jpeg((200, 30, 30)), png((30, 30, 200))
    vqa_schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE), ("question", pa.string()),
                            ("answer", pa.string())])
    vqa = [
        {"id": "ok-bytes", "image": {"bytes": red, "path": "red.jpg"}, "question": "Colour?", "answer": "Red."},
        {"id": "ok-path-only", "image": {"bytes": None, "path": "../images/blue.png"}, "question": "Colour?",
         "answer": "Blue."},
        {"id": "ok-placeholder", "image": {"bytes": blue, "path": None}, "question": "<image>\nColour?",
         "answer": "Blue."},
        {"id": "ok-no-image", "image": None, "question": "Two plus two?", "answer": "Four."},
        {"id": "bad-empty_image", "image": {"bytes": b"", "path": "empty.jpg"}, "question": "Colour?",
         "answer": "None."},
        {"id": "bad-missing_text", "image": {"bytes": red, "path": None}, "question": None, "answer": "Red."},
    ]
    features = {"id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                "question": {"dtype": "string", "_type": "Value"}, "answer": {"dtype": "string", "_type": "Value"}}
    (root / "vqa").mkdir(parents=True, exist_ok=True)
    pq.write_table(_hf_table(vqa, vqa_schema, features), root / "vqa" / "train-00000-of-00001.parquet",
                   row_group_size=4)
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    chat_schema = pa.schema([("id", pa.string()), ("messages", pa.list_(msg)), ("images", pa.list_(IMAGE_TYPE))])
    chat = [
        {"id": "ok-chat", "messages": [{"role": "user", "content": "<image>Colour?"},
                                       {"role": "assistant", "content": "Red."}],
         "images": [{"bytes": red, "path": None}]},
        {"id": "bad-image_count_mismatch", "messages": [{"role": "user", "content": "<image><image>Colour?"},
                                                       {"role": "assistant", "content": "Red."}],
         "images": [{"bytes": red, "path": None}]},
        {"id": "bad-multi_image", "messages": [{"role": "user", "content": "Same?"},
                                              {"role": "assistant", "content": "No."}],
         "images": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}]},
    ]
    features = {"id": {"dtype": "string", "_type": "Value"}, "images": {"feature": {"_type": "Image"},
                "_type": "Sequence"}, "messages": [{"role": {"dtype": "string", "_type": "Value"},
                                                    "content": {"dtype": "string", "_type": "Value"}}]}
    pq.write_table(_hf_table(chat, chat_schema, features), root / "chat.parquet")


def write_cauldron(root: Path) -> None:
    red, blue = jpeg((200, 30, 30)), png((30, 30, 200))
    text = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    schema = pa.schema([("images", pa.list_(IMAGE_TYPE)), ("texts", pa.list_(text))])

    def t(user: str, assistant: str) -> dict[str, str]:
        return {"user": user, "assistant": assistant, "source": "VQAv2"}

    # the_cauldron has no id column: ids are `<file stem>-<record>`; record 3 is multi_image, 4 missing text.
    rows = [
        {"images": [{"bytes": red, "path": None}], "texts": [t("What colour is the square?", "Red.")]},
        {"images": [{"bytes": blue, "path": None}], "texts": [t("Colour?", "Blue."), t("Sure?", "Yes.")]},
        {"images": [], "texts": [t("Two plus two?", "Four.")]},
        {"images": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}], "texts": [t("Same?", "No.")]},
        {"images": [{"bytes": red, "path": None}], "texts": [{"user": "Colour?", "assistant": None, "source": "x"}]},
    ]
    features = {"images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
                "texts": [{"user": {"dtype": "string", "_type": "Value"},
                           "assistant": {"dtype": "string", "_type": "Value"},
                           "source": {"dtype": "string", "_type": "Value"}}]}
    (root / "vqav2").mkdir(parents=True, exist_ok=True)
    pq.write_table(_hf_table(rows, schema, features), root / "vqav2" / "train-00000-of-00001.parquet")


def write_broken(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not really a parquet file" * 4)
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["a", "b"]}), root / "wrong_schema.parquet")
    records = llava_records()[:3]
    text = json.dumps(records)
    (root / "truncated.json").write_text(text[: int(len(text) * 0.7)])


def make_format_fixtures(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    writers = {"llava": write_llava, "sharegpt": write_sharegpt, "hf": write_hf, "cauldron": write_cauldron,
               "broken": write_broken}
    for name, write in writers.items():
        write(out / name)
    return {name: str(out / name) for name in writers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    print(json.dumps(make_format_fixtures(args.out), indent=2))


if __name__ == "__main__":
    main()
