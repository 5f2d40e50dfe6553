"""Write small data fixtures in the real external formats, generated rather than hand-made.

    python scripts/make_fixtures.py --out DIR [--seed 7] [--samples 8] [--bench 6]

DIR/mimicit/       SYN_instructions.json, SYN.parquet (urlsafe base64, pandas image-id index), SYN_train.json:
                   the MIMIC-IT/Otter input of `otterhd data convert`
DIR/magnifierbench/data/test-00000-of-00001.parquet: the HF MagnifierBench parquet layout
DIR/shards/        the same MIMIC-IT data converted to shards (what the converter produces)

Deterministic per seed, so a fixture can be regenerated and compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from otterhd_ray.data.formats.mimicit import convert_mimicit
from otterhd_ray.data.synth import BENCH_FILE, synthesize, write_mimicit


def make_fixtures(out: Path, seed: int = 7, num_samples: int = 8, num_bench: int = 6) -> dict:
    mimicit = write_mimicit(out / "mimicit", num_samples=num_samples, seed=seed, name="SYN")
    stats = convert_mimicit(
        mimicit["instructions"], mimicit["images"], out / "shards", group_related=True, overwrite=True
    )
    # synthesize() writes train shards too; only its benchmark file is a fixture.
    scratch = out / ".bench-scratch"
    synthesize(scratch, num_train=0, num_bench=num_bench, seed=seed)
    bench = out / BENCH_FILE
    bench.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(scratch / BENCH_FILE), bench)
    shutil.rmtree(scratch)
    return {"mimicit": mimicit, "shards": stats.to_dict(), "magnifierbench": str(bench)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--samples", type=int, default=8, help="MIMIC-IT instructions (one image each)")
    parser.add_argument("--bench", type=int, default=6, help="MagnifierBench items")
    args = parser.parse_args()
    print(json.dumps(make_fixtures(args.out, args.seed, args.samples, args.bench), indent=2))


if __name__ == "__main__":
    main()
