"""Joining or starting the Ray cluster that every distributed stage runs on."""

from __future__ import annotations

import os

from histodiff_ray.config import Config


def init_ray(cfg: Config) -> None:
    """Connect to ``cfg.ray.address`` ("auto" joins a cluster started with `ray start`), or to
    RAY_ADDRESS (as `ray job submit` sets it); otherwise start a new local cluster — never silently
    join whatever cluster happens to run on the machine. Credentials never go into the runtime env:
    the pyarrow filesystems that tasks receive carry them, so nothing secret lands in job metadata."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
