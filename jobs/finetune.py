"""Ray job entry point: `ray job submit --working-dir . -- python jobs/finetune.py --config FILE [k=v ...]`.

The same as `otterhd finetune --config FILE [k=v ...]` (`otterhd_ray.finetune.main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` ships the repo without installing it: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
