"""`otterhd data convert / validate`: resolve the format and the inputs, then run the importer (in this process
or on Ray Data) and return its stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otterhd_ray.data.formats.common import DEFAULT_MAX_PIXELS, Converter, ConvertStats, run_conversion
from otterhd_ray.data.formats.detect import detect_format
from otterhd_ray.data.formats.hf import CauldronConverter, HFConverter
from otterhd_ray.data.formats.llava import LlavaConverter
from otterhd_ray.data.formats.mimicit import convert_mimicit
from otterhd_ray.data.formats.sharegpt import AlpacaConverter, ShareGPTConverter, load_dataset_info

CONVERTERS: dict[str, type[Converter]] = {
    "llava": LlavaConverter,
    "sharegpt": ShareGPTConverter,
    "alpaca": AlpacaConverter,
    "hf": HFConverter,
    "cauldron": CauldronConverter,
}
FORMATS = (*CONVERTERS, "mimicit", "auto")


@dataclass
class ConvertRequest:
    """Everything `otterhd data convert` / `validate` was asked (out_dir None: validate, write nothing)."""

    format: str
    inputs: Sequence[str]
    out_dir: str | None
    image_root: str | None = None
    dataset_info: str | None = None
    dataset: str | None = None
    source: str | None = None
    use_ray: bool = False
    overwrite: bool = False
    progress: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    images: str | None = None  # MIMIC-IT images parquet / JSON
    train_config: str | None = None
    group_related: bool = False


def _expand(inputs: Sequence[str]) -> list[str]:
    """Directories expand to their JSON / JSONL / parquet files (sorted, hidden and rejects files skipped)."""
    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl", ".parquet")
                           and not f.name.startswith((".", "_", "rejects")))
            if not found:
                raise ValueError(f"no .json / .jsonl / .parquet files under {item}")
            files += found
        elif not p.is_file():
            raise ValueError(f"file not found: {item}")
        else:
            files.append(str(p))
    return files


def _auto(files: list[str], say: Any) -> str:
    picked = {}
    for f in files:
        fmt, why = detect_format(f)
        say(f"auto: {f} -> {fmt} ({why})")
        picked.setdefault(fmt, []).append(f)
    if len(picked) > 1:
        raise ValueError("auto: inputs of different formats in one conversion: "
                         + "; ".join(f"{k}: {v[:2]}" for k, v in picked.items()) + "; convert them separately")
    return next(iter(picked))


def _mimicit_images(instructions: str, images: str | None) -> str:
    if images:
        return images
    stem = Path(instructions).name.removesuffix(".json").removesuffix("_instructions")
    for suffix in (".parquet", ".json"):
        candidate = Path(instructions).with_name(stem + suffix)
        if candidate.is_file() and candidate != Path(instructions):
            return str(candidate)
    raise ValueError(f"{instructions}: no images file found beside it ({stem}.parquet / {stem}.json); pass --images")


def convert(req: ConvertRequest, say: Any = print) -> ConvertStats:
    """Run the conversion `req` asks for; ValueError for a user mistake (one line naming the file / flag)."""
    fmt, inputs = req.format, list(req.inputs)
    kwargs: dict[str, Any] = {"image_root": req.image_root, "source": req.source, "max_pixels": req.max_pixels}
    if req.dataset_info or req.dataset:
        if not (req.dataset_info and req.dataset):
            raise ValueError("--dataset-info and --dataset go together")
        info = load_dataset_info(req.dataset_info, req.dataset)
        if fmt not in ("auto", info.formatting):
            raise ValueError(f"--format {fmt} but {req.dataset_info} says {req.dataset!r} is {info.formatting}")
        fmt, inputs = info.formatting, inputs or info.files
        kwargs.update(image_root=req.image_root or info.media_dir, source=req.source or info.name,
                      columns=info.columns)
        if fmt == "sharegpt":
            kwargs["tags"] = info.tags
    if not inputs:
        raise ValueError("no input files given")
    files = _expand(inputs)
    if fmt == "auto":
        fmt = _auto(files, say)
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "mimicit":
        if len(files) != 1 or req.use_ray:
            raise ValueError("mimicit converts one instructions JSON at a time, in one process (no --ray)")
        return convert_mimicit(files[0], _mimicit_images(files[0], req.images), req.out_dir, source=req.source,
                               group_related=req.group_related, train_config=req.train_config,
                               overwrite=req.overwrite, max_pixels=req.max_pixels)
    converter = CONVERTERS[fmt](**kwargs)
    if req.use_ray:
        from otterhd_ray.data.formats.parallel import run_conversion_ray

        return run_conversion_ray(converter, files, req.out_dir, overwrite=req.overwrite, progress=req.progress)
    return run_conversion(converter, files, req.out_dir, overwrite=req.overwrite, progress=req.progress)
