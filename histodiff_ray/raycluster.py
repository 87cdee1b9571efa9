"""Joining or starting the Ray cluster that every distributed stage runs on, quietly.

The console shows the project's own progress and summaries. Quiet (the default), Ray's own
progress bars and its INFO and WARNING log records are switched off in every process of the job:
Ray Data's operator bars from every task, Train's per-report lines, and the state-API warning that
Train's placement-group cleaner repeats every few seconds (there is no dashboard to ask). Errors
still show; the driver's records down to INFO go to the command's log file (``console.log_to_file``),
and Ray's process logs (raylet, GCS, each worker's stdout and stderr) stay in
``/tmp/ray/session_latest/logs``. ``histodiff --verbose`` or ``HISTODIFF_VERBOSE=1`` brings everything
back (``histodiff_ray/console.py``).
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data

from histodiff_ray.config import Config
from histodiff_ray.console import VERBOSE_ENV, note_in_log, route_library_logs, verbose


def ray_log_level() -> str:
    """The level of Ray's own loggers (Data, Train, core) in every process of this job."""
    return "INFO" if verbose() else "ERROR"


def quiet_train_worker() -> None:
    """In a Ray Train worker: Train's per-report INFO line, logged under a logger named by its file
    path, which Train's own level filter does not recognise as Train's."""
    if not verbose():
        from ray.train.v2._internal.execution import context  # noqa: PLC0415 — Train workers only; pinned Ray

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def setup_worker() -> None:
    """Run in every worker process of the job as it starts (``worker_process_setup_hook``; so it
    imports nothing heavy): this cluster's address for Ray's state API, which Train's
    placement-group cleaner queries. Without it, another Ray cluster on the same machine makes each
    query fail with a traceback ("Found multiple active Ray instances")."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def init_ray(cfg: Config) -> None:
    """Connect to ``cfg.ray.address`` ("auto" joins a cluster started with `ray start`), or to
    RAY_ADDRESS (as `ray job submit` sets it); otherwise start a new local cluster — never silently
    join whatever cluster happens to run on the machine. Credentials never go into the runtime env:
    the pyarrow filesystems that tasks receive carry them, so nothing secret lands in job metadata."""
    quiet = not verbose()
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    logging.getLogger("ray.data").setLevel(ray_log_level())
    if not ray.is_initialized():
        _start_or_join(cfg, quiet)
    route_library_logs()  # Ray's loggers are set now: the command's log file keeps their records
    note_in_log(
        f"Ray cluster {ray.get_runtime_context().gcs_address}: each node keeps its processes' logs "
        "(workers' stdout and stderr, Ray Data's ray-data.log) in /tmp/ray/session_latest/logs"
    )


def _start_or_join(cfg: Config, quiet: bool) -> None:
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    # Ray Data's bars and logs come from whichever task or actor runs a dataset (Train's split
    # coordinator among them); Train's print patch would send each of our progress lines twice.
    env = {
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
            # Workers on other machines (`ray start`, KubeRay) see the verbosity only through the job.
            "env_vars": env if quiet else {VERBOSE_ENV: "1"},
        },
    )
