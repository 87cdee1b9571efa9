"""Joining or starting the Ray cluster that every distributed stage runs on, quietly.

The console shows the project's own progress; Ray's progress bars and its INFO/WARNING logs (Ray
Data's operator bars from every task, Train's per-report lines, the state-API warnings of Train's
placement-group cleaner, which has no dashboard to ask) stay in Ray's session logs
(``/tmp/ray/session_latest/logs``). ``histodiff --verbose`` or ``HISTODIFF_VERBOSE=1`` brings them back
(``histodiff_ray/console.py``).
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data
from diffusers.utils import logging as diffusers_logging
from ray.train.v2._internal.execution import context as train_context  # pinned Ray: see quiet_libraries

from histodiff_ray.config import Config
from histodiff_ray.console import verbose


def ray_log_level() -> str:
    """The level of Ray's own loggers (Data, Train, core) in every process of this job."""
    return "INFO" if verbose() else "ERROR"


def quiet_libraries() -> None:
    """In this process: Ray Train's per-report INFO line (logged under a logger named by its file
    path, which Train's own level filter does not recognise) and diffusers' loading notices."""
    if verbose():
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()


def setup_worker() -> None:
    """Run in every worker process of the job as it starts (``worker_process_setup_hook``): quiet
    libraries, and this cluster's address for Ray's state API, which Train's placement-group
    cleaner queries; without it, another Ray cluster on the machine makes the query fail with a
    traceback ("Found multiple active Ray instances")."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_libraries()


def init_ray(cfg: Config) -> None:
    """Connect to ``cfg.ray.address`` ("auto" joins a cluster started with `ray start`), or to
    RAY_ADDRESS (as `ray job submit` sets it); otherwise start a new local cluster — never silently
    join whatever cluster happens to run on the machine. Credentials never go into the runtime env:
    the pyarrow filesystems that tasks receive carry them, so nothing secret lands in job metadata."""
    quiet = not verbose()
    quiet_libraries()
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    logging.getLogger("ray.data").setLevel(ray_log_level())
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    # Ray Data's bars and logs come from whichever task or actor runs a dataset (Train's split
    # coordinator among them); Train's print patch would send each of our progress lines twice.
    quiet_env = {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DATA_LOG_LEVEL": "ERROR",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # Ray's own deprecations inside Ray Data; DDP's note on 1×1-conv gradient strides (harmless).
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::UserWarning:torch.autograd.graph",
        "DIFFUSERS_VERBOSITY": "error",  # "install accelerate", at every model load in every actor
    }
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=ray_log_level(),
        logging_config=ray.LoggingConfig(log_level=ray_log_level()),
        runtime_env={
            "worker_process_setup_hook": "histodiff_ray.raycluster.setup_worker",
            **({"env_vars": quiet_env} if quiet else {}),
        },
    )
