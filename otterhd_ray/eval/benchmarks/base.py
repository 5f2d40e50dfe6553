"""What every benchmark shares: items, loading HF parquet (local or hub), prompts, scoring, aggregation.

A benchmark is a subclass of `Benchmark` in its own module under `eval/benchmarks/`, registered with
`@register`: it turns a dataset row into an `Item` (image bytes, the prompts to ask, the target, and a small
JSON-able `doc` of what scoring needs), scores one item's responses (`score`, async because a judge may be
asked) and aggregates the scored items into its official metrics (`aggregate`).

Nothing here needs Ray or a model: `score_predictions` scores responses made anywhere (the `--predictions`
CLI, a training worker) with the same code the Ray pipeline uses.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from otterhd_ray.data.shards import open_parquet_named

if TYPE_CHECKING:
    from otterhd_ray.eval.config import BenchDatasetSpec


@dataclass(frozen=True)
class Item:
    id: str
    image: bytes  # encoded image as stored (JPEG / PNG)
    prompts: dict[str, str]  # question key -> text for the model (before the model's chat wrapping)
    target: str  # the ground truth as text (lmms-eval's `target`)
    doc: dict[str, Any]  # JSON-able fields scoring needs (answer, options, category, ...)


@dataclass
class LoadResult:
    items: list[Item]
    num_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids

    def skip(self, reason: str, item_id: str) -> None:
        self.skipped[reason] += 1
        self.skipped_ids.setdefault(reason, []).append(item_id)


@dataclass
class Aggregate:
    """A run's scores. `scores` use lmms-eval's metric names and scales (results.json); `headline` is what the
    summary table shows; `breakdown` the per-category tables; `counts` / `extra` join the run's metrics."""

    scores: dict[str, float | None]
    headline: list[tuple[str, str]]
    breakdown: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreContext:
    """What scoring may use: the MC parse mode and the judge (`None` when the benchmark needs none)."""

    mc_parse: str = "strict"
    judge: Any = None

    @property
    def judge_kind(self) -> str:
        return getattr(self.judge, "kind", "none")


def format_for_model(model_name: str, text: str) -> str:
    """The seed's per-model wrapping: `fuyu` takes the raw text, `otterhd` the chat template."""
    if model_name == "fuyu":
        return text
    if model_name == "otterhd":
        return f"User: {text} Assistant:"
    raise ValueError(f"unknown model name {model_name!r}; expected 'fuyu' or 'otterhd'")


def image_bytes(image: Any) -> bytes | None:
    """An HF Image cell (struct<bytes, path>, raw bytes, or a PIL image) -> encoded bytes; None if unusable."""
    if isinstance(image, dict):
        data = image.get("bytes")
        if data:
            return bytes(data)
        path = image.get("path")
        if path and Path(path).is_file():
            return Path(path).read_bytes()
        return None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image) or None
    if hasattr(image, "save"):  # a PIL image (the `datasets` library decodes Image features)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return None


def is_missing(value: Any) -> bool:
    """None, NaN (pandas-written parquet) or the string 'nan' / '' (MMBench's empty options and hints)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def pct(x: float | None, scale: float = 100.0) -> str:
    """A fraction as a percentage for the report ('n/a' when undefined)."""
    return "n/a" if x is None else f"{scale * x:.1f}%"


# ------------------------------------------------------------------------------------ multiple choice
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def options_lines(options: Mapping[str, str]) -> str:
    """`A. x\nB. y`: lmms-eval's option layout for MMBench, SEED-Bench and ScienceQA."""
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def score_mc(response: str, options: Mapping[str, str], answer: str, mode: str) -> dict[str, Any]:
    """The strict or the seed's legacy parser on a reply; the legacy parser reads options from 'A. x, B. y'."""
    from otterhd_ray.eval.scoring import parse_mc  # scoring imports nothing heavy either

    seed_question = ", ".join(f"{k}. {v}" for k, v in options.items())
    pred = parse_mc(response, dict(options), seed_question, mode)  # type: ignore[arg-type]
    return {"mc_parse": mode, "pred": pred, "correct": pred == answer}


def accuracy_by(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """{doc[key]: {correct, total, accuracy}} over records whose `correct` is a bool."""
    table: dict[str, list[int]] = {}
    for r in records:
        values = r["doc"].get(key)
        for value in values if isinstance(values, list) else [values]:
            cell = table.setdefault(str(value), [0, 0])
            cell[0] += int(bool(r["correct"]))
            cell[1] += 1
    return {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(table.items())}


# ------------------------------------------------------------------------------------------- loading
def parquet_files(path: Path, split: str, config: str | None = None) -> list[Path]:
    """The split's parquet files under an HF dataset dir (`[config/]data/<split>-*.parquet` and variants)."""
    if path.is_file():
        return [path]
    if config and (path / config).is_dir():
        path = path / config
    for pattern in (
        f"data/{split}-*.parquet",
        f"{split}-*.parquet",
        f"{split}/*.parquet",
        f"data/{split}/*.parquet",
    ):
        files = sorted(path.glob(pattern))
        if files:
            return files
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise ValueError(f"no parquet files for split {split!r} under {path}")
    return files


def rows_from_parquet(files: list[Path]) -> Iterator[dict[str, Any]]:
    # Row group at a time: a benchmark with large images is never held twice in memory.
    for f in files:
        reader = open_parquet_named(f)  # a corrupt file: one line naming it, not an ArrowInvalid traceback
        for i in range(reader.num_row_groups):
            yield from reader.read_row_group(i).to_pylist()


def _keep_images_encoded(ds: Any, columns: Sequence[str]) -> Any:
    """Decoding to PIL and re-encoding would change JPEG bytes: cast Image features to decode=False."""
    import datasets

    for col in columns:
        feature = ds.features.get(col)
        try:
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
            elif feature is not None:
                ds = ds.cast_column(col, datasets.Sequence(datasets.Image(decode=False)))
        except Exception:  # noqa: BLE001 - another `datasets` version: PIL images are re-encoded as PNG
            pass
    return ds


def rows_from_hub(spec: BenchDatasetSpec, image_columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    offline = "offline? download it and set data_path to the local directory"
    try:
        import datasets  # optional: only for hub ids
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_dataset(
                spec.data_path, spec.config, split=spec.split, cache_dir=spec.cache_dir
            )
        except Exception as err:
            raise ValueError(
                f"could not load {spec.data_path!r} from the Hugging Face hub ({type(err).__name__}); {offline}"
            ) from None
        yield from _keep_images_encoded(ds, image_columns)
        return
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{spec.data_path!r} is not a local path and neither `datasets` nor `huggingface_hub` is installed"
        ) from None
    try:
        local = snapshot_download(spec.data_path, repo_type="dataset", cache_dir=spec.cache_dir)
    except Exception as err:
        raise ValueError(
            f"could not download {spec.data_path!r} from the Hugging Face hub ({type(err).__name__}); {offline}"
        ) from None
    yield from rows_from_parquet(parquet_files(Path(local), spec.split, spec.config))


def iter_rows(spec: BenchDatasetSpec, image_columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a local dir / parquet file, or of a hub id (owner/name) when the path does not exist."""
    path = Path(spec.data_path).expanduser()
    if path.exists():
        return rows_from_parquet(parquet_files(path, spec.split, spec.config))
    if spec.data_path.startswith((".", "/", "~")) or spec.data_path.count("/") != 1:
        raise ValueError(f"data_path {spec.data_path!r} does not exist and is not a hub id (owner/name)")
    return rows_from_hub(spec, image_columns)


# ------------------------------------------------------------------------------------------ benchmark
class Benchmark:
    """Base of every benchmark module. Subclasses set the class attributes and implement `to_item`, `score`
    and `aggregate`; `load` and the prompt wrapping are shared."""

    name: ClassVar[str]  # the `datasets: - name:` key (the seed's names)
    task: ClassVar[str]  # lmms-eval's task name (results.json, samples_<task>.jsonl)
    hub_id: ClassVar[str]  # default data_path
    default_split: ClassVar[str]
    default_config: ClassVar[str | None] = None  # HF config (a sub-directory of a local copy)
    image_columns: ClassVar[tuple[str, ...]] = ("image",)
    question_keys: ClassVar[tuple[str, ...]] = ("answer",)
    uses_judge: ClassVar[bool] = False
    post_prompt: ClassVar[str] = ""  # lmms-eval's default suffix; `post_prompt:` in the YAML replaces it
    metric_names: ClassVar[tuple[str, ...]] = ()  # lmms-eval metric names, all higher-is-better
    default_max_new_tokens: ClassVar[int | None] = None  # when the dataset sets none (long answers)

    def __init__(self, spec: BenchDatasetSpec) -> None:
        self.spec = spec

    # -- prompts
    def wrap(self, text: str) -> str:
        """The dataset's `prompt` prepended (the seed's convention), the post prompt appended."""
        post = self.post_prompt if self.spec.post_prompt is None else self.spec.post_prompt
        text = f"{text}{post}"
        return f"{self.spec.prompt} {text}" if self.spec.prompt else text

    # -- loading
    def to_item(self, row: dict[str, Any], result: LoadResult) -> Item | None:
        raise NotImplementedError

    def load(self) -> LoadResult:
        """All usable items (first `max_items` if set) plus the counted skips."""
        result = LoadResult(items=[])
        seen: set[str] = set()
        for row in iter_rows(self.spec, self.image_columns):
            if self.spec.max_items and len(result.items) >= self.spec.max_items:
                break
            result.num_rows += 1
            item = self.to_item(row, result)
            if item is None:
                continue
            if item.id in seen:
                result.skip("duplicate_id", item.id)
                continue
            seen.add(item.id)
            result.items.append(item)
        return result

    def single_image(
        self, row: dict[str, Any], column: str, item_id: str, result: LoadResult
    ) -> bytes | None:
        """The row's one image (a cell or a one-element list); None after counting why not."""
        cell = row.get(column)
        if isinstance(cell, list):
            if len(cell) != 1:
                result.skip("multi_image" if len(cell) > 1 else "no_image", item_id)
                return None
            cell = cell[0]
        if cell is None:
            result.skip("no_image", item_id)
            return None
        data = image_bytes(cell)
        if data is None:
            result.skip("unreadable_image", item_id)
        return data

    # -- scoring
    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        """Per-item fields (parsed answer, correctness, judge reply ...). A judged benchmark sets `judged`
        (False: not judged, never counted wrong) and `judge_error`."""
        raise NotImplementedError

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        """The official metrics over the scored records (one per evaluated item, with the item's doc)."""
        raise NotImplementedError

    def sample_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """lmms-eval's per-sample metric values (samples_<task>.jsonl)."""
        return {name: record.get("correct") for name in self.metric_names}


class LetterChoiceBenchmark(Benchmark):
    """Single-answer letter choice as lmms-eval asks it (MMBench, SEED-Bench, ScienceQA): the item's doc holds
    `options` {letter: text} and `answer` (a letter); the reply is parsed by the configured MC parser, and the
    default aggregate is the fraction right under the first metric name, broken down by one doc key."""

    post_prompt = LETTER_SUFFIX
    default_max_new_tokens = 16
    breakdown: ClassVar[tuple[str, str]] = ("", "")  # (doc key, breakdown name); ("", "") for none
    head_label: ClassVar[str] = "acc"

    async def score(self, item: Item, responses: Mapping[str, str], ctx: ScoreContext) -> dict[str, Any]:
        return score_mc(responses.get("answer", ""), item.doc["options"], item.doc["answer"], ctx.mc_parse)

    def aggregate(self, loaded: LoadResult, records: Sequence[dict[str, Any]]) -> Aggregate:
        acc = ratio(sum(1 for r in records if r["correct"]), len(records))
        key, name = self.breakdown
        return Aggregate({self.metric_names[0]: acc}, [(self.head_label, pct(acc))],
                         breakdown={name: accuracy_by(records, key)} if key else {},
                         counts={"unparsed": unparsed(records)})


def unparsed(records: Sequence[dict[str, Any]]) -> int:
    """Replies that named no option (counted wrong)."""
    return sum(1 for r in records if r["pred"] is None)


async def score_records(
    bench: Benchmark,
    items: Sequence[Item],
    responses: Mapping[str, Mapping[str, str]],
    ctx: ScoreContext,
) -> list[dict[str, Any]]:
    """Score every item that has responses, concurrently (the judge bounds itself), in item order."""
    todo = [it for it in items if it.id in responses]

    async def one(item: Item) -> dict[str, Any]:
        scored = await bench.score(item, responses[item.id], ctx)
        rec = {"id": item.id, "target": item.target, "doc": item.doc, "responses": dict(responses[item.id])}
        return {**rec, **scored}

    return list(await asyncio.gather(*(one(it) for it in todo)))


def score_predictions(
    bench: Benchmark,
    loaded: LoadResult,
    responses: Mapping[str, Mapping[str, str]],
    ctx: ScoreContext | None = None,
) -> tuple[list[dict[str, Any]], Aggregate]:
    """Score responses made anywhere (no Ray, no model): per-item records and the benchmark's metrics.

    `responses` maps item id -> {question key: text}; items without responses are left out of the metrics.
    """
    ctx = ctx or ScoreContext()

    async def go() -> list[dict[str, Any]]:
        try:
            return await score_records(bench, loaded.items, responses, ctx)
        finally:
            if hasattr(ctx.judge, "aclose"):
                await ctx.judge.aclose()

    records = asyncio.run(go())
    return records, bench.aggregate(loaded, records)
