"""The diffusion stage on the S3 server: a worker killed mid-run, resume by re-running, every
checkpoint on storage complete and loadable; sampling; latent sets mixed by weight. The drill's UNet
predicts v (ε, the default, is what every other test trains), so sampling and the fine-tune's check
of its parent's prediction type are tested on it. (Fine-tuning itself is tested in
tests/test_pipeline.py, where its class-conditional form is generated from.)"""

import copy
import io
import json
import os
import subprocess
import tempfile
import threading
import time

import pytest
import torch
from safetensors.torch import load as load_safetensors

from histodiff_ray.storage import download_dir, list_files, open_location, read_bytes
from histodiff_ray.train.diffusion import pretrain
from tests.train.conftest import csv_rows


def _worker_pids():
    """The Train workers of this test's own Ray cluster: children of its raylet (another cluster on
    the machine, such as a long run beside the suite, has RayTrainWorker processes too, and they are
    not ours to kill)."""
    from ray._private import worker

    raylet = worker._global_node.all_processes["raylet"][0].process.pid
    out = subprocess.run(["pgrep", "-P", str(raylet), "-f", "RayTrainWorker"], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid in out.split())


def _registered_checkpoint_step(run):
    """The step of the latest checkpoint Ray Train has registered (written to storage AND reported
    by every worker); files of a checkpoint still being reported do not count."""
    try:
        snapshot = json.loads(read_bytes(run.join("checkpoint_manager_snapshot.json")))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


def _assert_checkpoints_complete(run):
    """Every checkpoint folder on storage is one Ray Train registered, and complete: an upload cut
    by the SIGKILL must not survive the run."""
    snapshot = json.loads(read_bytes(run.join("checkpoint_manager_snapshot.json")))
    registered = sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])
    on_storage = sorted({f.split("/")[0] for f in list_files(run) if f.startswith("checkpoint_") and "/" in f})
    assert registered and on_storage == registered
    for d in on_storage:
        state = json.loads(read_bytes(run.join(d, "state.json")))
        for model in ("unet", "unet_ema"):
            json.loads(read_bytes(run.join(d, model, "config.json")))
            weights = load_safetensors(read_bytes(run.join(d, model, "diffusion_pytorch_model.safetensors")))
            assert weights and all(torch.isfinite(w).all() for w in weights.values())
        optimizer = torch.load(io.BytesIO(read_bytes(run.join(d, "optimizer.pt"))), weights_only=True)
        assert optimizer["state"] and state["step"] >= 1


def test_killed_worker_restarts_from_the_latest_checkpoint_then_a_rerun_resumes(latents):
    cfg, bucket = latents
    cfg.ray.num_workers = 2  # one of two DDP workers is killed
    run_uri = f"s3://{bucket}/runs/drill"
    run = open_location(run_uri, cfg.storage)
    cfg.diffusion.max_steps = 10
    cfg.diffusion.prediction_type = "v_prediction"
    cfg.ray.max_failures = 1
    killed = {}

    def kill_one_worker_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            step = _registered_checkpoint_step(run)
            pids = _worker_pids()
            if step and pids:
                killed["pid"], killed["after_step"] = pids[-1], step
                os.kill(pids[-1], 9)
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    info = pretrain(cfg, [(f"s3://{bucket}/latents", 1.0)], run_uri)
    killer.join(timeout=5)
    assert "pid" in killed, "no worker was killed: the drill did not happen"
    final = info["final_metrics"]
    assert info["step"] == 10
    # The restarted workers loaded a checkpoint taken at or after the kill's last visible one.
    assert final["resumed_from_step"] >= killed["after_step"] >= 2
    assert [r["step"] for r in csv_rows(run)] == list(range(1, 11))  # one continuous curve, no repeated steps
    _assert_checkpoints_complete(run)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(run.join("model"), tmp)
        unet = UNet2DModel.from_pretrained(f"{local}/unet")
        vae = AutoencoderKL.from_pretrained(f"{local}/vae")
        scheduler = DDPMScheduler.from_pretrained(f"{local}/scheduler")
        assert (
            unet.config.sample_size == 16
            and vae.config.latent_channels == cfg.autoencoder.latent_channels
            and scheduler.config.beta_end == 0.0155
            and scheduler.config.prediction_type == "v_prediction"
        )

    # Launching again under the same run continues from its latest checkpoint.
    cfg.diffusion.max_steps = 12
    again = pretrain(cfg, [(f"s3://{bucket}/latents", 1.0)], run_uri)
    assert again["step"] == 12 and again["final_metrics"]["resumed_from_step"] == 10
    assert [r["step"] for r in csv_rows(run)] == list(range(1, 13))


def test_sample_writes_a_png_grid_of_decoded_tiles(latents):
    from PIL import Image

    from histodiff_ray.cli import main
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.ldm import LatentDiffusion
    from histodiff_ray.train.diffusion import finetune

    cfg, bucket = latents
    run_uri = f"s3://{bucket}/runs/drill"
    if not any(n == "run.json" for n in list_files(open_location(run_uri, cfg.storage))):
        pytest.skip("needs the finished run of the drill test")
    overrides = [
        f"storage.{k}={getattr(cfg.storage, k)}" for k in ("endpoint_url", "access_key_id", "secret_access_key")
    ]
    out = f"s3://{bucket}/samples/grid.png"
    assert main(["sample", "--run", run_uri, "--n", "4", "--steps", "3", "--output", out, *overrides]) == 0
    grid = Image.open(io.BytesIO(read_bytes(open_location(out, cfg.storage))))
    assert grid.size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2)) and grid.mode == "RGB"
    assert LatentDiffusion.from_run(open_location(run_uri, cfg.storage)).prediction_type == "v_prediction"
    # An ε fine-tune of a v-model would start from weights that answer another question: refused, with the fix.
    eps_cfg = copy.deepcopy(cfg)
    eps_cfg.diffusion.prediction_type = "epsilon"
    with pytest.raises(HistodiffError, match="predicts v_prediction.*set diffusion.prediction_type=v_prediction"):
        finetune(eps_cfg, [(f"s3://{bucket}/latents", 1.0)], f"s3://{bucket}/runs/eps-of-v", run_uri)


@pytest.mark.parametrize("warmup, expected", [(True, 0.9), (False, 0.001)])
def test_the_ema_warm_up_forgets_the_starting_weights_fast_and_can_be_turned_off(warmup, expected):
    from histodiff_ray.train.diffusion import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999, warmup=warmup)
    torch.nn.init.ones_(model.weight)
    ema.update(model, step=0)  # decay min(0.999, 1/10) with the warm-up, 0.999 without
    assert ema.model.weight.item() == pytest.approx(expected)
    torch.nn.init.zeros_(ema.model.weight)
    ema.update(model, step=1_000_000)  # late in training both average with ema_decay
    assert ema.model.weight.item() == pytest.approx(0.001)
