"""What one epoch of a Ray Train worker's data stream costs to start, against a batch in steady state:

    RAY_AUTH_MODE=disabled .venv/bin/python bench/epoch_start.py      # ~1 min; run it alone

A bare TorchTrainer (``--workers`` workers × 0.5 CPU, nothing but the iteration in the loop)
iterates a materialized dataset of latent-sized rows (8×16×16 float32 and a 5-class target) split
across its workers, batches of ``--batch`` per worker with the training loops' local shuffle
buffer, three ways: ``--batches`` epochs of one batch each, one epoch of ``--batches`` batches, and
one epoch of 400 batches. Rank 0 prints the seconds per batch of each. Every pass over a worker's
shard is a new epoch of the streaming split (a barrier across workers and a new execution in the
split coordinator); a train set smaller than one global batch pays that at every step, which is
why ``train/runner.py`` repeats short train sets within one epoch (``MIN_STEPS_PER_EPOCH``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import DataConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402


def loop(config: dict) -> None:
    shard = ray.train.get_dataset_shard("train")
    batches, start = 0, time.perf_counter()
    for _ in range(config["epochs"]):
        for _ in shard.iter_torch_batches(
            batch_size=config["batch"], drop_last=True, local_shuffle_buffer_size=4 * config["batch"]
        ):
            batches += 1
    seconds = time.perf_counter() - start
    ray.train.report({"batches": batches, "seconds": seconds})
    if ray.train.get_context().get_world_rank() == 0:
        print(
            f"{config['epochs']:4d} epoch(s), {batches:4d} batches: {seconds:6.2f} s, "
            f"{seconds / batches * 1e3:6.1f} ms per batch",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Train workers (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="rows per worker and batch (default 64)")
    parser.add_argument("--batches", type=int, default=30, help="batches of the first two ways (default 30)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    global_batch = args.batch * args.workers
    row = {"latent": np.zeros((8, 16, 16), np.float32), "target": np.full(5, 0.2, np.float32)}
    with tempfile.TemporaryDirectory(prefix="epoch-start-") as runs:
        for epochs, rows in ((args.batches, global_batch), (1, global_batch * args.batches), (1, global_batch * 400)):
            data = ray.data.from_items([row] * rows, override_num_blocks=2 * args.workers).materialize()
            TorchTrainer(
                loop,
                train_loop_config={"epochs": epochs, "batch": args.batch},
                scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 0.5}),
                run_config=RunConfig(name=f"epochs-{epochs}-rows-{rows}", storage_path=runs),
                datasets={"train": data},
                dataset_config=DataConfig(datasets_to_split=["train"]),
            ).fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
