"""`--format auto`: pick the importer of an input file by its content, and say why."""

from __future__ import annotations

import json
from pathlib import Path

from otterhd_ray.data.formats.hf import text_layout


def _first_json_record(path: str) -> object:
    """The first record of a JSON array / JSONL file, or the top-level keys of a JSON object document."""
    import ijson

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    text = head.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"["):
        with open(path, "rb") as f:
            for record in ijson.items(f, "item"):
                return record
        return None
    first_line = text.split(b"\n", 1)[0]
    try:
        return json.loads(first_line)
    except ValueError:
        pass
    # A pretty-printed JSON object (MIMIC-IT instructions): list its top-level keys without loading it.
    keys = {}
    with open(path, "rb") as f:
        for prefix, event, value in ijson.parse(f):
            if prefix == "" and event == "map_key":
                keys[value] = None
                if len(keys) >= 8:
                    break
    return keys


def detect_format(path: str) -> tuple[str, str]:
    """(format, reason) for one input file; ValueError naming the file when nothing fits."""
    if str(path).endswith(".parquet"):
        from otterhd_ray.data.shards import open_parquet_named

        with open_parquet_named(path) as pf:
            names = pf.schema_arrow.names
        if "base64" in names:
            raise ValueError(f"{path}: a MIMIC-IT images parquet; convert its instructions JSON "
                             "(--format mimicit INSTRUCTIONS.json --images THIS.parquet)")
        layout = text_layout(names)
        if layout == "texts" and "images" in names:
            return "cauldron", "parquet with columns images + texts"
        if layout is not None:
            return "hf", f"parquet with text layout {layout!r}"
        raise ValueError(f"{path}: a parquet file of no known layout; columns: {names}")
    if not Path(path).is_file():
        raise ValueError(f"file not found: {path}")
    try:
        record = _first_json_record(path)
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user-facing answer
        raise ValueError(f"{path}: not JSON / JSONL ({type(err).__name__}: {err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the first record is not a JSON object")
    keys = set(record)
    if "data" in keys and ("meta" in keys or str(path).endswith("_instructions.json")):
        return "mimicit", "a JSON object with 'data' (MIMIC-IT instructions)"
    if {"instruction", "output"} <= keys:
        return "alpaca", "records with instruction/output"
    if "messages" in keys:
        return "sharegpt", "records with messages"
    if "conversations" in keys:
        if "images" in keys:
            return "sharegpt", "records with conversations + images"
        return "llava", "records with conversations" + (" + image" if "image" in keys else " (text-only)")
    raise ValueError(f"{path}: cannot tell the format from the first record's keys {sorted(keys)[:12]}; "
                     "pass --format")
