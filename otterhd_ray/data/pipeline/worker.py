"""What a pipeline process keeps between calls, and what it asks of Ray.

Index builders and Ray Data preprocessing tasks are fresh function calls in long-lived worker processes; the
processor is the one costly thing worth keeping between them (per process, through `functools.lru_cache`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otterhd_ray.data.processor import FuyuProcessor


@lru_cache(maxsize=4)
def processor_for(tokenizer_dir: str, template: str) -> FuyuProcessor:
    """The processor of (tokenizer, template), built once per process: loading a tokenizer costs far more than
    preprocessing a sample. Imported lazily so that importing the pipeline does not load transformers."""
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.tokenizer import load_tokenizer

    return FuyuProcessor(load_tokenizer(tokenizer_dir), template)


def ray_ready() -> bool:
    """Ray is importable and initialised in this process (inside a Ray Train worker it is)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def ray_has_spare_cpu() -> bool:
    """Auto mode uses Ray Data only when a preprocessing task could get a CPU: on a cluster whose CPUs the
    training workers hold, 1-CPU tasks would wait forever (ray#44687); preprocessing in-process is then the
    only way forward (and says so)."""
    if not ray_ready():
        return False
    import ray

    if ray.available_resources().get("CPU", 0.0) >= 1.0:
        return True
    print("otterhd pipeline: Ray has no free CPU for preprocessing tasks; preprocessing in the training process")
    return False
