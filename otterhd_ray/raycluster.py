"""`connect()`: the one way training and evaluation join or start Ray.

Order: an already initialised Ray (a test's fixture, a notebook) is used as is; else the `address` given by the
config, else `RAY_ADDRESS` (set by `ray job submit` and on cluster nodes); else a local Ray is started.

A local Ray gets more logical CPUs than the caller reserves: on a 2-core machine, training workers or predictor
actors holding every CPU leave Ray Data's 1-CPU read / preprocess tasks pending forever (ray#44687), so the
local cluster always keeps at least `SPARE_CPUS` beyond the reservation, and never fewer than `MIN_LOCAL_CPUS`.
"""

from __future__ import annotations

import math
import os

SPARE_CPUS = 2
MIN_LOCAL_CPUS = 4


def local_num_cpus(reserved_cpus: float = 0.0) -> int:
    """Logical CPUs of a local Ray for callers reserving `reserved_cpus` (workers or actors)."""
    return max(os.cpu_count() or 1, math.ceil(reserved_cpus) + SPARE_CPUS, MIN_LOCAL_CPUS)


def connect(address: str | None = None, *, reserved_cpus: float = 0.0) -> bool:
    """Join `address` / `RAY_ADDRESS`, or start a local Ray; True when this call initialised Ray.

    Joining a cluster forwards the workers' logs to this driver (a Ray job shows them); a local Ray starts
    without the dashboard (no port to bind, nothing to serve on a laptop or in CI).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=local_num_cpus(reserved_cpus), include_dashboard=False)
    return True


def has_cluster_address(address: str | None = None) -> bool:
    """Whether `connect(address)` would join a running cluster rather than start a local Ray."""
    return bool(address or os.environ.get("RAY_ADDRESS"))
