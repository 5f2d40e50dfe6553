"""Ray job entry point: `ray job submit --working-dir . -- python jobs/evaluate.py --config FILE [k=v ...]`.

Inside a job, RAY_ADDRESS is set, so the evaluation connects to the cluster instead of starting a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships the repo without installing it: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
