"""`--ray`: the same conversion as `run_conversion`, spread over Ray Data tasks by file and chunk.

Chunks: a JSONL file is cut into byte ranges at line ends (the driver counts lines, so every reject keeps its
record index in the original file); a parquet file into runs of row groups; a JSON array cannot be split
without parsing, so the driver streams it once (ijson) into JSONL chunk files in a temporary directory. Each
task converts one chunk into its own shard files `shard-CCCCC-NNNNN.parquet` and returns its stats and rejects;
the driver merges them in chunk order and writes one `rejects.parquet`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from otterhd_ray.data.formats.common import (
    Converter,
    ConvertStats,
    Sink,
    _iter_jsonl,
    _progress,
    convert_file,
    iter_json_records,
)
from otterhd_ray.data.shards import PathLike, ShardWriter, open_parquet_named, write_rejects

CHUNK_RECORDS = 20_000


def _jsonl_chunks(path: str, chunk_records: int) -> list[dict[str, Any]]:
    """Byte ranges of about `chunk_records` non-blank lines each, with the index of their first record."""
    chunks, start, first, count, pos = [], 0, 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            if line.strip():
                count += 1
            if count - first >= chunk_records:
                chunks.append({"kind": "jsonl", "file": path, "read": path, "start": start, "stop": pos,
                               "first": first})
                start, first = pos, count
    if pos > start:
        chunks.append({"kind": "jsonl", "file": path, "read": path, "start": start, "stop": pos, "first": first})
    return chunks


def _split_json_array(path: str, chunk_records: int, tmp: str) -> list[dict[str, Any]]:
    """Stream a JSON array into JSONL chunk files (bounded memory); a broken array ends with a chunk whose
    last line is the parse error, so the task reports it as the unreadable file it is."""
    chunks: list[dict[str, Any]] = []
    out, first, n = None, 0, 0

    def close() -> None:
        if out is not None:
            out.close()
            name = out.name
            chunks.append({"kind": "jsonl", "file": path, "read": name, "start": 0, "stop": os.path.getsize(name),
                           "first": first})

    try:
        for index, record in iter_json_records(path):
            if out is None or index - first >= chunk_records:
                close()
                first = index
                out = open(os.path.join(tmp, f"chunk-{len(chunks):06d}.jsonl"), "w", encoding="utf-8")
            out.write(json.dumps(record) + "\n")
            n = index + 1
    except ValueError as err:  # broken array: the records before it are converted, the file is named
        close()
        chunks.append({"kind": "error", "file": path, "error": str(err), "first": n})
        return chunks
    close()
    return chunks


def _parquet_chunks(path: str, chunk_records: int) -> list[dict[str, Any]]:
    with open_parquet_named(path) as pf:
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    chunks, groups, rows, first = [], [], 0, 0
    for i, n in enumerate(sizes):
        groups.append(i)
        rows += n
        if rows >= chunk_records:
            chunks.append({"kind": "parquet", "file": path, "groups": groups, "first": first})
            first, groups, rows = first + rows, [], 0
    if groups:
        chunks.append({"kind": "parquet", "file": path, "groups": groups, "first": first})
    return chunks


def plan_chunks(files: Sequence[str], chunk_records: int, tmp: str) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    for path in files:
        try:
            if path.endswith(".parquet"):
                chunks += _parquet_chunks(path, chunk_records)
                continue
            with open(path, "rb") as f:
                is_array = f.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"[")
            chunks += (_split_json_array(path, chunk_records, tmp) if is_array
                       else _jsonl_chunks(path, chunk_records))
        except (ValueError, OSError) as err:
            chunks.append({"kind": "error", "file": path, "error": str(err), "first": 0})
    return chunks


def _chunk_records(converter: Converter, chunk: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    if chunk["kind"] == "error":
        raise ValueError(chunk["error"])
    if chunk["kind"] == "parquet":
        with converter.prepare(chunk["file"]) as pf:  # type: ignore[attr-defined] - HF converters
            index = chunk["first"]
            for batch in pf.iter_batches(batch_size=64, row_groups=chunk["groups"]):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
        return
    with open(chunk["read"], "rb") as f:
        f.seek(chunk["start"])
        data = f.read(chunk["stop"] - chunk["start"])
    for offset, record in _iter_jsonl(data.splitlines(keepends=True)):
        yield chunk["first"] + offset, record


def convert_chunk(converter: Converter, chunk: dict[str, Any], number: int, out_dir: str | None) -> dict[str, Any]:
    """Convert one chunk (in a Ray task); returns its stats and rejects as JSON-able values."""
    stats = ConvertStats(format=converter.name)
    writer = ShardWriter(out_dir, prefix=f"shard-{number:05d}") if out_dir is not None else None
    sink = Sink(stats, writer)
    convert_file(converter, chunk["file"], sink, records=_chunk_records(converter, chunk))
    if writer is not None:
        writer.close()
        stats.files = list(writer.files)
    return {"number": number, "stats": stats, "rejects": sink.rejects}


def run_conversion_ray(converter: Converter, inputs: Sequence[str], out_dir: PathLike | None, *,
                       overwrite: bool = False, progress: bool = False,
                       chunk_records: int = CHUNK_RECORDS, concurrency: int | None = None) -> ConvertStats:
    """`run_conversion` on Ray Data: one task per chunk (joins a running cluster, else starts a local Ray)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    out = None if out_dir is None else str(out_dir)
    if out is not None:
        ShardWriter(out, overwrite=overwrite).close()  # refuse or clear existing shards once, up front
    tmp = tempfile.mkdtemp(prefix="otterhd-convert-")
    try:
        chunks = plan_chunks([str(p) for p in inputs], chunk_records, tmp)
        items = [{"number": i, "chunk": json.dumps(c)} for i, c in enumerate(chunks)]

        def task(batch: dict[str, Any]) -> dict[str, Any]:
            results = [convert_chunk(converter, json.loads(c), int(n), out)
                       for n, c in zip(batch["number"], batch["chunk"], strict=True)]
            return {"result": [json.dumps(_to_json(r)) for r in results]}

        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            task, batch_size=1, num_cpus=1, concurrency=concurrency or None)
        results = []
        bar = _progress(None, progress, f"{converter.name} (ray)")
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            results.append(result)
            if bar is not None:
                bar.update(result["stats"]["num_records"])
        if bar is not None:
            bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _merge(converter.name, results, out, t0)


def _to_json(result: dict[str, Any]) -> dict[str, Any]:
    st: ConvertStats = result["stats"]
    return {"number": result["number"], "rejects": result["rejects"],
            "stats": {**st.to_dict(), "files": st.files, "examples": st.examples}}


def _merge(name: str, results: list[dict[str, Any]], out: str | None, t0: float) -> ConvertStats:
    total = ConvertStats(format=name)
    rejects: list[dict[str, Any]] = []
    for result in sorted(results, key=lambda r: r["number"]):
        s = result["stats"]
        part = ConvertStats(format=name, num_samples=s["num_samples"], num_rejected=s["num_rejected"],
                            num_records=s["num_records"], num_text_only=s["num_text_only"],
                            num_turns=s["num_turns"], bad_files=s["bad_files"], files=s["files"],
                            examples=s["examples"])
        part.reasons.update(s["reasons"])
        total.merge(part)
        rejects += result["rejects"]
    total.seconds = time.perf_counter() - t0
    if out is not None:
        total.out_dir = out
        total.rejects_path = write_rejects(out, rejects)
    return total
