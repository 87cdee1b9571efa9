"""Joining or starting the Ray cluster that every distributed stage runs on."""

from __future__ import annotations

from histodiff_ray.config import Config


def init_ray(cfg: Config) -> None:
    """Connect to ``cfg.ray.address`` (or RAY_ADDRESS, as `ray job submit` sets), else start a local
    cluster. Credentials never go into the runtime env: the pyarrow filesystems that tasks receive
    carry them, so nothing secret lands in Ray's job metadata or logs."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=cfg.ray.address, include_dashboard=False, logging_level="WARNING")
