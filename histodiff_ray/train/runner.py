"""The step runner every training stage runs on, and the Ray Train plumbing around it.

A stage (``train/autoencoder.py``, ``train/diffusion.py``, ``train/guide.py``) is a driver that
reads its data and calls ``fit``, and a worker loop that builds its models and trains them on a
``StepRunner``. The runner owns what every stage shares and must do the same way:

- the worker's seed and device;
- resume: models on their device, *then* the optimizer, *then* both restored from Ray Train's
  latest checkpoint of the run (``place_and_restore``: restored optimizer state lands where each
  parameter is at that moment, so the other order leaves it on the CPU and the first step after a
  restart fails on a GPU);
- the optimizer step: fused AdamW, the LR the stage's schedule gives, optional gradient
  accumulation and clipping;
- logging: every ``log_every`` steps a row of the window's means and its samples/s; every
  ``checkpoint_every`` steps and at the end of each phase, the stage's val scores (rank 0) and a
  checkpoint; rows kept in a rank-0 history that every checkpoint carries, so a restarted run has
  one continuous curve; ``ray.train.report`` on every worker at the same steps (it is a barrier).

A checkpoint folder holds diffusers-format model folders (safetensors), ``optimizer.pt`` (tensors
only, read back with ``weights_only=True``), ``state.json`` (step, history) and the history as
``metrics.csv`` and TensorBoard events. No checkpoint is ever unpickled.

Driver side: ``mix_by_weight`` makes a stage's train stream (weighted parts, reshuffled every pass,
at least ``MIN_STEPS_PER_EPOCH`` steps an epoch); ``fit`` runs a loop on ``ray.num_workers`` workers
under the run's name (Ray Train V2: launching again with the same ``RunConfig(storage_path, name)``
resumes from the latest checkpoint, and ``FailureConfig`` restarts failed workers from it);
``export`` publishes the final checkpoint's models as diffusers folders with the curves and run.json.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file
from tensorboardX import SummaryWriter

from histodiff_ray.config import Config, config_from_dict
from histodiff_ray.console import logger
from histodiff_ray.errors import HistodiffError
from histodiff_ray.plots import curves_png
from histodiff_ray.raycluster import quiet_train_worker, ray_log_level
from histodiff_ray.storage import Location, download_dir, read_bytes, upload_dir, write_atomic

log = logger(__name__)


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CPU and CUDA): the default on CPU is a Python loop over
    the parameters, which costs a tenth of a small UNet's step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def warmup_cosine(base_lr: float, step: int, warmup: int, cosine_to: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps; then constant, or a cosine decay to 0 at step ``cosine_to``."""
    lr = base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr
    if cosine_to is not None and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, cosine_to - warmup))
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


class StepRunner:
    """One worker's training run: see the module docstring. A stage loop reads::

    runner = StepRunner(config, "autoencoder")
    optimizer = runner.restore({"vae": vae}, [{"params": list(vae.parameters())}], lr=ae.lr)
    model = ray.train.torch.prepare_model(vae)
    for batch in runner.batches(train, batch_size, until=ae.max_steps):
        loss = ...
        runner.optimizer_step(loss, lr=warmup_cosine(ae.lr, runner.step, ...))
        runner.record(len(batch["image"]), l1=...)
        runner.log(total=ae.max_steps, log_every=..., checkpoint_every=..., evaluate=...)
    """

    def __init__(self, config: dict, name: str, *, seed_offset: int = 0, rank_stride: int = 1):
        self.cfg: Config = config_from_dict(config["cfg"], check_relations=False)
        self.name = name
        quiet_train_worker()
        self.rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(self.cfg.seed + seed_offset + rank_stride * self.rank)
        self.device = ray.train.torch.get_device()
        self.step, self.history, self.resumed_from = 0, [], None
        self.lr = 0.0
        self._window: list[tuple[int, dict]] = []
        self._micro = 0
        self._started = time.perf_counter()

    def restore(self, models: dict, param_groups: list, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """Place ``models`` (saved by name in every checkpoint) on this worker's device, build fused
        AdamW over ``param_groups`` and resume both from the run's latest checkpoint, if any."""
        self.models = models
        self.optimizer, state = start_or_resume(models, lambda: adamw(param_groups, lr, weight_decay), self.device)
        self.step, self.history = state.get("step", 0), state.get("history", [])
        if state:
            self.resumed_from = self.step
        self._started = time.perf_counter()  # the first row's rate counts training, not setup
        return self.optimizer

    def batches(self, shard, batch_size: int, until: int, **iter_args) -> Iterator[dict]:
        """Batches of ``shard`` on this worker's device, epoch after epoch, until ``until`` optimizer steps."""
        while self.step < until:
            empty = True
            for batch in shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, device=self.device, **iter_args
            ):
                empty = False
                yield batch
                if self.step >= until:
                    return
            if empty:
                raise HistodiffError(
                    f"{self.name}: this worker's share of the training data holds less than one "
                    f"batch of {batch_size}; lower the batch size or ray.num_workers"
                )

    def optimizer_step(self, loss: torch.Tensor, lr: float, *, accumulate: int = 1, clip: float | None = None) -> bool:
        """Backpropagate ``loss``; on every ``accumulate``-th call also set the LR, clip the
        gradients' global norm to ``clip`` (if given), step and zero them. Returns whether it stepped."""
        (loss / accumulate).backward()
        self._micro += 1
        if self._micro % accumulate:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        return True

    def record(self, samples: int, **values: float) -> None:
        """One batch's numbers for the next log row (averaged over the batches since the last one)."""
        self._window.append((samples, values))

    def log(
        self,
        *,
        total: int,
        log_every: int,
        checkpoint_every: int,
        phase_end: bool = False,
        evaluate: Callable[[], dict] | None = None,
    ) -> None:
        """At a log step, report a row; at a checkpoint step or the end of a phase, also the stage's
        val scores (``evaluate``, rank 0) and a checkpoint of the models."""
        at_checkpoint = self.step % checkpoint_every == 0 or phase_end
        if not (at_checkpoint or self.step % log_every == 0):
            return
        elapsed = time.perf_counter() - self._started
        keys = self._window[0][1] if self._window else {}
        row = {
            "step": self.step,
            **{k: sum(v[k] for _, v in self._window) / len(self._window) for k in keys},
            "lr": self.lr,
            "samples_per_s": sum(n for n, _ in self._window) / max(elapsed, 1e-9),
        }
        if self.resumed_from is not None:
            row["resumed_from_step"] = self.resumed_from
        checkpoint = None
        if self.rank == 0:
            if at_checkpoint and evaluate is not None:
                row.update(evaluate())
            self.history.append(row)
            if at_checkpoint:
                checkpoint = _save_checkpoint(self.models, self.optimizer, {"step": self.step, "history": self.history})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
            log.info(f"[{self.name}] step {self.step}/{total}: {shown}")  # Ray forwards it to the driver
        ray.train.report(row, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
        self._window, self._started = [], time.perf_counter()


def write_checkpoint(folder: str, models: dict, optimizer, state: dict) -> None:
    """Models as diffusers folders (safetensors), the optimizer's state and the loop's ``state``."""
    for name, model in models.items():
        # safetensors stores contiguous tensors only: save a copy in the default layout.
        copy.deepcopy(model).to(memory_format=torch.contiguous_format).save_pretrained(
            os.path.join(folder, name), safe_serialization=True
        )
    torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)
    write_metrics(state["history"], folder)


def _save_checkpoint(models: dict, optimizer, state: dict) -> ray.train.Checkpoint:
    folder = tempfile.mkdtemp(prefix="ckpt-")  # deleted by ray.train.report once it is in storage
    write_checkpoint(folder, models, optimizer, state)
    return ray.train.Checkpoint.from_directory(folder)


def place_and_restore(models: dict, make_optimizer, device, folder: str | None):
    """Put ``models`` on ``device``, then build their optimizer (``make_optimizer()``), then restore
    both from the checkpoint ``folder`` if there is one; returns (optimizer, the loop's state).

    The order is the point: ``Optimizer.load_state_dict`` puts each state tensor where its
    parameter is at that moment, so state restored before the model moves stays behind on the CPU
    and the first step after a restart fails on a GPU. (``device`` may be anything ``Module.to``
    takes; the test moves to another dtype, which a CPU can show.)"""
    if folder is not None:  # weights load on the CPU, before the move
        for name, model in models.items():
            weights = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
            if os.path.exists(weights):  # a model that a later phase adds (a discriminator) starts fresh
                model.load_state_dict(load_file(weights))
    for model in models.values():
        model.to(device)
    optimizer = make_optimizer()
    if folder is None:
        return optimizer, {}
    saved = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location="cpu")
    # Parameter groups that a later phase adds start fresh; parameters are numbered across groups in
    # order, so the new groups' numbers follow the saved ones.
    saved["param_groups"] += optimizer.state_dict()["param_groups"][len(saved["param_groups"]) :]
    optimizer.load_state_dict(saved)
    with open(os.path.join(folder, "state.json")) as f:
        return optimizer, json.load(f)


def start_or_resume(models: dict, make_optimizer, device):
    """``place_and_restore`` from Ray Train's latest checkpoint of this run, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return place_and_restore(models, make_optimizer, device, None)
    # Each worker downloads its own copy: `as_directory` shares one local folder between the
    # workers of a node, and one of them may clean it up while another is still reading.
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        return place_and_restore(models, make_optimizer, device, checkpoint.to_directory(tmp))


def write_metrics(history: list[dict], folder: str) -> None:
    """metrics.csv and a TensorBoard events file, rewritten from the whole history (so a run that
    was restarted still has one continuous curve)."""
    if not history:
        return
    keys = sorted({k for row in history for k in row})
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    with SummaryWriter(os.path.join(folder, "tensorboard"), flush_secs=1) as tb:
        for row in history:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])


# Every pass over a Train worker's stream is a new streaming-split epoch: 0.25-0.45 s of barrier and
# coordinator start-up on the 2-core machine (bench/epoch_start.py), as long as a step of the guide.
# So a train set of fewer rows than this many steps (a guide on a few hundred labeled latents takes
# one or two) is repeated within one epoch, which a loop that counts steps cannot tell from more epochs.
MIN_STEPS_PER_EPOCH = 50


def min_epoch_rows(cfg: Config, batch_size: int) -> int:
    """Rows of ``MIN_STEPS_PER_EPOCH`` steps of ``batch_size`` on every worker."""
    return MIN_STEPS_PER_EPOCH * batch_size * cfg.ray.num_workers


def mix_by_weight(parts: list[tuple[object, int, float]], min_rows: int = 0):
    """One epoch of a train stream that draws from each (dataset, rows, weight) part in proportion
    to its weight: a part is repeated (whole copies plus a random sample) to its share of the parts'
    total rows, or of ``min_rows`` where that is more; in a fresh random order at every pass (the
    parts would otherwise stream one after the other)."""
    total_rows = sum(rows for _, rows, _ in parts)
    epoch_rows = max(total_rows, min_rows)
    total_weight = sum(w for _, _, w in parts)
    pieces = []
    for ds, rows, weight in parts:
        share = weight / total_weight * epoch_rows / rows
        whole, fraction = int(share), share - int(share)
        pieces += [ds] * whole
        if fraction > 1e-3:
            pieces.append(ds.random_sample(fraction))
    mixed = pieces[0].union(*pieces[1:]) if len(pieces) > 1 else pieces[0]
    return mixed.random_shuffle()


def fit(cfg: Config, loop, loop_config: dict, datasets: dict, run: Location):
    """Run ``loop`` on ``cfg.ray.num_workers`` Ray Train workers; the run is named by ``run``."""

    parent, name = run.path.rstrip("/").rsplit("/", 1)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), **loop_config},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=run.filesystem,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=ray_log_level()),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    remove_unregistered_checkpoints(run)
    result = trainer.fit()
    remove_unregistered_checkpoints(run)
    return result


def remove_unregistered_checkpoints(run: Location) -> list[str]:
    """Delete ``checkpoint_*`` folders that Ray Train never registered.

    Ray Train uploads a checkpoint folder and only then records it in
    ``checkpoint_manager_snapshot.json``; a worker or driver killed mid-upload leaves a partial
    folder that no resume will load. Checkpoints pruned by ``num_to_keep`` can also survive on S3
    (the prune's folder delete finds no folder marker there). Removing both before and after each
    run keeps only complete, registered checkpoints on storage. Returns the names removed.
    """
    try:
        snapshot = json.loads(read_bytes(run.join("checkpoint_manager_snapshot.json")))
        registered = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except FileNotFoundError:
        registered = set()
    infos = run.filesystem.get_file_info(pafs.FileSelector(run.path, allow_not_found=True))
    removed = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name not in registered:
            # S3 folders are key prefixes: delete the keys, then the (possibly absent) marker.
            run.filesystem.delete_dir_contents(info.path, missing_dir_ok=True)
            try:
                run.filesystem.delete_dir(info.path)
            except FileNotFoundError:
                pass
            removed.append(name)
    if removed:
        log.info(
            f"[train] removed {len(removed)} checkpoint folder(s) Ray Train has not registered: "
            f"{', '.join(sorted(removed))}"
        )
    return removed


def export(result, run: Location, models: dict[str, str], info: dict, extra_dirs: dict[str, str] | None = None) -> None:
    """Publish the final checkpoint's models (checkpoint name → name under RUN/model) as diffusers
    folders, plus ``extra_dirs`` (local folders), the curves and run.json (``info`` + step and final metrics)."""
    if result.checkpoint is None:
        raise HistodiffError(f"the run at {run} finished without a checkpoint; check its logs")
    with result.checkpoint.as_directory() as folder:
        for src, dst in models.items():
            upload_dir(os.path.join(folder, src), run.join("model", dst))
        with open(os.path.join(folder, "metrics.csv"), "rb") as f:
            write_atomic(run.join("metrics.csv"), f.read())
        upload_dir(os.path.join(folder, "tensorboard"), run.join("tensorboard"))
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    for dst, local in (extra_dirs or {}).items():
        upload_dir(local, run.join("model", dst))
    if state["history"]:
        title = f"{info['kind']} run {run.uri.rstrip('/').rsplit('/', 1)[-1]}"
        write_atomic(run.join("curves.png"), curves_png(state["history"], title))
    info = {**info, "step": state["step"], "final_metrics": state["history"][-1] if state["history"] else {}}
    write_atomic(run.join("run.json"), json.dumps(info, indent=1, sort_keys=True).encode())


def load_unet_weights(run: Location) -> dict:
    """The finished diffusion run's (EMA) UNet weights, as a state dict."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(run.join("model", "unet"), tmp)
        return load_file(os.path.join(local, "diffusion_pytorch_model.safetensors"))
