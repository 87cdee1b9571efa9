"""The step runner without Ray: a checkpoint written on one device and resumed on another (on a CPU:
another dtype, the one move a CPU can show), phases added to a finished run; unregistered checkpoint
folders removed; what a Train worker imports."""

import json
import subprocess
import sys

import torch

from histodiff_ray.config import load_config
from histodiff_ray.models.autoencoder import autoencoder_loss, build_autoencoder
from histodiff_ray.storage import open_location
from histodiff_ray.train.runner import place_and_restore, remove_unregistered_checkpoints, write_checkpoint


def test_train_workers_import_neither_the_judge_nor_timm():
    # A Train worker imports its stage's module and rebuilds the driver's checked config; the judge's
    # timm and torchmetrics, or a second check of the config (which asks timm for its model names),
    # are imports no worker uses, at the start of every worker of every training run.
    code = (
        "import sys, histodiff_ray.train.diffusion, histodiff_ray.train.guide\n"
        "from histodiff_ray.config import Config, config_from_dict\n"
        "config_from_dict(Config().to_dict(), check_relations=False)\n"
        "print([m for m in ('timm', 'torchmetrics', 'histodiff_ray.judge') if m in sys.modules])"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def _step(vae, optimizer, dtype):
    x = torch.rand(2, 3, 16, 16, dtype=dtype) * 2 - 1
    posterior = vae.encode(x).latent_dist
    loss, _, _ = autoencoder_loss(x, vae.decode(posterior.sample()).sample, posterior.kl(), 1e-6)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _saved_run(folder):
    """A tiny autoencoder trained one step on the CPU in float32, checkpointed to ``folder``."""
    cfg = load_config("cpu", ["autoencoder.block_out_channels=8,16", "autoencoder.norm_groups=4"])
    torch.manual_seed(0)
    vae = build_autoencoder(cfg.autoencoder, 16)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    _step(vae, optimizer, torch.float32)
    write_checkpoint(str(folder), {"vae": vae}, optimizer, {"step": 1, "history": []})
    return cfg, vae


def test_resume_builds_the_optimizer_where_the_model_now_is(tmp_path):
    cfg, vae = _saved_run(tmp_path)

    # A restart that trains elsewhere than where it saved: a GPU after a CPU-side build, here float64.
    restarted = build_autoencoder(cfg.autoencoder, 16)
    optimizer, state = place_and_restore(
        {"vae": restarted}, lambda: torch.optim.AdamW(restarted.parameters(), lr=1e-3), torch.float64, str(tmp_path)
    )
    assert state["step"] == 1
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float64 for t in moments)
    for saved, resumed in zip(vae.state_dict().values(), restarted.state_dict().values()):
        assert torch.equal(saved.double(), resumed)
    # Restoring the optimizer before the move (the old order) left its state in float32, and this
    # step failed with "expected dtype float ... but got dtype double".
    _step(restarted, optimizer, torch.float64)


def test_a_fresh_start_places_the_model_and_returns_no_state():
    cfg = load_config("cpu", ["autoencoder.block_out_channels=8,16", "autoencoder.norm_groups=4"])
    vae = build_autoencoder(cfg.autoencoder, 16)
    optimizer, state = place_and_restore({"vae": vae}, lambda: torch.optim.AdamW(vae.parameters()), torch.float64, None)
    assert state == {} and all(p.dtype == torch.float64 for p in vae.parameters())
    assert optimizer.param_groups[0]["params"][0].dtype == torch.float64 and optimizer.state == {}


def test_a_phase_added_to_a_finished_run_starts_its_new_model_and_parameter_group_fresh(tmp_path):
    # autoencoder.gan_steps raised on a finished run: its checkpoint has no discriminator and a
    # one-group optimizer; the autoencoder and its optimizer state come back, the discriminator starts.
    from histodiff_ray.models.autoencoder import PatchDiscriminator

    cfg, vae = _saved_run(tmp_path)
    restarted, disc = build_autoencoder(cfg.autoencoder, 16), PatchDiscriminator(channels=4)
    fresh = {k: v.clone() for k, v in disc.state_dict().items()}
    groups = [{"params": list(restarted.parameters())}, {"params": list(disc.parameters()), "weight_decay": 0.0}]
    optimizer, state = place_and_restore(
        {"vae": restarted, "disc": disc}, lambda: torch.optim.AdamW(groups, lr=1e-3), torch.float32, str(tmp_path)
    )
    assert state["step"] == 1 and len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), restarted.state_dict().values()))
    assert all(torch.equal(fresh[k], v) for k, v in disc.state_dict().items())
    assert len(optimizer.state) == len(list(vae.parameters()))  # the autoencoder's moments only
    _step(restarted, optimizer, torch.float32)


def test_unregistered_checkpoint_folders_are_removed(tmp_path):
    run = open_location(str(tmp_path / "run"), load_config("cpu").storage)
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_partial"):
        (tmp_path / "run" / name / "unet").mkdir(parents=True)
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}, {"checkpoint_dir_name": "checkpoint_b"}]}
        )
    )
    assert remove_unregistered_checkpoints(run) == ["checkpoint_partial"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint_a",
        "checkpoint_b",
        "checkpoint_manager_snapshot.json",
        "model",
    ]


def test_mix_by_weight_draws_sources_in_proportion(ray_local):
    import ray.data

    from histodiff_ray.train.runner import mix_by_weight

    # A few blocks each, as tile shards are: from_items' default of one block per ~row made the shuffle slow.
    small = ray.data.from_items([{"src": "small"}] * 100, override_num_blocks=2)
    large = ray.data.from_items([{"src": "large"}] * 1000, override_num_blocks=4)
    rows = mix_by_weight([(small, 100, 1.0), (large, 1000, 1.0)]).take_all()
    n_small = sum(r["src"] == "small" for r in rows)
    n_large = len(rows) - n_small
    # Equal weights: each source fills about half of an epoch of 1,100 rows.
    assert 500 <= n_small <= 600 and 480 <= n_large <= 620
    # Interleaved, not whole copies one after another: in a random order of ~550 + 550 rows the
    # longest run of one source is ~10 rows; concatenated copies arrive in runs of 100 or more.
    longest = run = 1
    for before, row in zip(rows, rows[1:]):
        run = run + 1 if row["src"] == before["src"] else 1
        longest = max(longest, run)
    assert longest < 30


def test_a_train_set_of_few_steps_is_repeated_within_one_epoch(ray_local):
    import collections

    import ray.data

    from histodiff_ray.train.runner import MIN_STEPS_PER_EPOCH, min_epoch_rows, mix_by_weight

    cfg = load_config("cpu", ["ray.num_workers=2"])
    assert min_epoch_rows(cfg, 8) == MIN_STEPS_PER_EPOCH * 8 * 2
    few = ray.data.from_items([{"i": i} for i in range(100)], override_num_blocks=2)
    rows = [r["i"] for r in mix_by_weight([(few, 100, 1.0)], min_rows=1000).take_all()]
    # Ten whole copies, shuffled together: every row ten times, not 0..99 ten times in order.
    assert collections.Counter(rows) == {i: 10 for i in range(100)} and rows[:100] != list(range(100))
    many = ray.data.from_items([{"i": i} for i in range(100)], override_num_blocks=2)
    assert sorted(r["i"] for r in mix_by_weight([(many, 100, 1.0)], min_rows=50).take_all()) == list(range(100))
