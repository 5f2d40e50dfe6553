"""Importers of other data formats into our shards (`otterhd data convert --format ...`).

    llava     LLaVA JSON / JSONL                      llava.py
    sharegpt  LLaMA-Factory sharegpt (+ dataset_info)  sharegpt.py
    alpaca    LLaMA-Factory alpaca (+ dataset_info)    sharegpt.py
    hf        HF datasets parquet (datasets.Image)     hf.py
    cauldron  the_cauldron parquet (images + texts)   hf.py
    mimicit   MIMIC-IT / Otter instructions + images  mimicit.py
    auto      picked per file by content               detect.py

The Fuyu layout rules every importer follows are in `common.py` (and docs/internals.md).
"""

from __future__ import annotations

from otterhd_ray.data.formats.common import Converter, ConvertStats, RecordError, run_conversion
from otterhd_ray.data.formats.convert import CONVERTERS, FORMATS, ConvertRequest, convert
from otterhd_ray.data.formats.mimicit import ParquetImages, convert_mimicit, decode_base64_image
from otterhd_ray.data.formats.sharegpt import load_dataset_info

__all__ = [
    "CONVERTERS", "FORMATS", "ConvertRequest", "ConvertStats", "Converter", "ParquetImages", "RecordError",
    "convert", "convert_mimicit", "decode_base64_image", "load_dataset_info", "run_conversion",
]
