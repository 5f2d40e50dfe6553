"""What the pipeline produced: counts, bucket histogram, packing efficiency and rejects, and their text report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from otterhd_ray.data.buckets import packing_efficiency

_SUMMED = ("num_micro_batches", "num_fillers", "num_samples", "num_tokens", "num_image_tokens",
           "num_target_tokens", "wait_seconds", "rejects", "buckets", "sources")


@dataclass
class PipelineStats:
    """What an iterator (or several, merged) produced. Tokens count real (non-filler) tokens only."""

    max_tokens: int
    num_micro_batches: int = 0
    num_fillers: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    num_image_tokens: int = 0
    num_target_tokens: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    buckets: Counter[str] = field(default_factory=Counter)  # "HxW" -> samples
    sources: Counter[str] = field(default_factory=Counter)
    wait_seconds: float = 0.0  # time the consumer waited for preprocessing

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (non-filler micro-batches x max_tokens)."""
        return packing_efficiency(self.num_tokens, self.num_micro_batches - self.num_fillers, self.max_tokens)

    @property
    def num_rejects(self) -> int:
        return sum(self.rejects.values())

    def merge(self, other: PipelineStats) -> PipelineStats:
        out = PipelineStats(max_tokens=self.max_tokens)
        for name in _SUMMED:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out


def _long_side_rows(buckets: Counter[str]) -> list[tuple[str, int]]:
    """(label, samples) by long side for the 10 most common long sides, plus "other" for the rest (native sizes
    give one long side per image)."""
    long_sides: Counter[int] = Counter()
    for bucket, n in buckets.items():
        long_sides[max(int(x) for x in bucket.split("x"))] += n
    shown = sorted(side for side, _ in long_sides.most_common(10))
    rows = [(str(side), long_sides[side]) for side in shown]
    rest = sum(buckets.values()) - sum(n for _, n in rows)
    if rest:
        rows.append(("other", rest))
    return rows


def format_stats(stats: PipelineStats, title: str = "input pipeline") -> str:
    """Bucket histogram, packing and reject statistics as a small text report."""
    real = stats.num_micro_batches - stats.num_fillers
    lines = [
        f"== {title} ==",
        f"samples {stats.num_samples}  micro-batches {stats.num_micro_batches} ({stats.num_fillers} filler)  "
        f"tokens {stats.num_tokens} (image {stats.num_image_tokens}, supervised {stats.num_target_tokens})",
        f"packing efficiency {stats.packing_efficiency:.2%} of {real} x {stats.max_tokens} token budget"
        + (f"  mean {stats.num_samples / real:.1f} samples/micro-batch" if real else ""),
        f"rejects {stats.num_rejects}" + (
            ": " + ", ".join(f"{r}={n}" for r, n in sorted(stats.rejects.items())) if stats.rejects else ""
        ),
        "sources: " + ", ".join(f"{s}={n}" for s, n in sorted(stats.sources.items())),
        f"buckets: {len(stats.buckets)} distinct sizes; samples by long side (px):",
    ]
    total = max(1, sum(stats.buckets.values()))
    for label, n in _long_side_rows(stats.buckets):
        lines.append(f"  {label:>5}  {n:6d}  {'#' * max(1, round(40 * n / total))}")
    top = sorted(stats.buckets.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    lines.append("most common sizes (HxW): " + ", ".join(f"{b}={n}" for b, n in top))
    return "\n".join(lines)
