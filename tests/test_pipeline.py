"""`histodiff pipeline` end to end on the paper profile (256 px tiles, narrowed widths), on the S3
server: killed after its autoencoder stage, rerun to the report, skipping the stages it finished, then
run with classifier-free guidance on what it made; a changed evaluate setting changes the hash of the
evaluation stage only."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from histodiff_ray.storage import exists, list_files, open_location, read_bytes, read_run_info

BIN = Path(sys.executable).parent


def test_stage_and_plan_hashes_are_the_ones_results_were_cached_under():
    # Computed by 792a729, before the per-stage batch sizes, sampling.sampler and the GPU requests
    # existed: at their neutral values those keys stay out of the hashes, so an upgrade reuses
    # existing pipeline folders and finishes existing synthetic sets instead of refusing them.
    from histodiff_ray.config import load_config
    from histodiff_ray.generate import make_plan
    from histodiff_ray.pipeline import stage_hash

    old_profile = [  # 792a729's cpu profile
        "diffusion.max_steps=2000",
        "diffusion.finetune_steps=600",
        "autoencoder.gan_steps=0",
        "autoencoder.latent_channels=4",
        "classifier.max_steps=3000",
    ]
    cfg = load_config("cpu", old_profile)
    assert [stage_hash(cfg, s) for s in ("autoencoder", "pretrain", "classifier", "generate", "evaluate")] == [
        "914e331e87",
        "16b9498d02",
        "558865ad5e",
        "ba1d69007f",
        "20c7fc6967",
    ]
    assert make_plan(cfg, ["A", "B"], 4, {})["hash"] == "bb13ac633eeb9cfe"
    changed = load_config("cpu", ["sampling.sampler=dpmsolver++", "diffusion.batch_size=8"])
    assert (
        stage_hash(changed, "pretrain") != "16b9498d02"
        and make_plan(changed, ["A", "B"], 4, {})["hash"] != "bb13ac633eeb9cfe"
    )
    # The adversarial decoder phase's settings count only when it is on.
    off = load_config("cpu", ["autoencoder.gan_steps=0", "autoencoder.gan_lr=1e-3", "autoencoder.latent_channels=4"])
    assert stage_hash(off, "autoencoder") == "914e331e87" != stage_hash(load_config("cpu"), "autoencoder")


def test_an_evaluate_setting_changes_the_evaluation_stage_hash_only():
    # With its parents' hashes unchanged, a stage whose hash is unchanged is skipped (the kill-and-resume test
    # below shows the skipping), so a changed evaluate setting reruns the evaluation and nothing upstream.
    from histodiff_ray.config import load_config
    from histodiff_ray.pipeline import STAGE_KEYS, stage_hash

    before, after = load_config("cpu"), load_config("cpu", ["evaluate.synthetic_ratio=0.5"])
    changed = [s for s in STAGE_KEYS if stage_hash(before, s, "parent") != stage_hash(after, s, "parent")]
    assert changed == ["evaluate"]


def test_timings_are_this_runs_stages_when_the_workdir_holds_another_settings_run(tmp_path):
    # A workdir keeps the markers of every setting it ran with (e.g. both guidance kinds); the
    # timings a run reports are the ones of the hashes it used, whatever order the markers list in.
    from histodiff_ray.config import load_config
    from histodiff_ray.pipeline import Stages

    cfg = load_config("cpu")
    slow = Stages(cfg, str(tmp_path))
    slow.run("synthetic", "bbbbbbbbbb", lambda out: time.sleep(0.5))
    slow.run("judge", "cccccccccc", lambda out: None)
    fast = Stages(cfg, str(tmp_path))
    fast.run("judge", "cccccccccc", lambda out: time.sleep(9))  # done before: skipped, its seconds reused
    fast.run("synthetic", "aaaaaaaaaa", lambda out: None)
    assert slow.timings()["synthetic"] >= 0.5 and fast.timings() == {"judge": 0.0, "synthetic": 0.0}


def _markers(work):
    stages = work.join("stages")
    return sorted(n.rsplit("-", 1)[0] for n in list_files(stages)) if exists(stages) else []


# bench/paper_smoke.py runs the paper profile at its model sizes (~13 minutes alone on 2 cores, past the
# suite's budget). Here the same run with only the widths narrowed (a sixteenth of the autoencoder's and
# ~1/36 of the UNet's FLOPs): tile size, latent shape, depths, channel multipliers, attention
# resolutions and heads, schedules, bf16 and every stage's settings stay the profile's.
NARROW = [
    "autoencoder.block_out_channels=32,64,128",
    "autoencoder.gan_channels=8",
    "unet.base_channels=32",
    "classifier.width=32",
]
# Two downstream runs per evaluation, not five: the pipeline's part is to hand the evaluation its inputs
# (every arm is tested in tests/test_evaluate.py). Pre-training reads the target's latents (no
# --unlabeled): a pool is one more ingest and encode through the same code, which bench/paper_smoke.py runs.
FAST = ["evaluate.arms=real+aug", "evaluate.synthetic_uses=mix"]


def test_paper_profile_pipeline_resumes_after_a_kill_then_runs_classifier_free_on_what_it_made(
    s3, s3_overrides, bucket, shared_data, ray_head, tmp_path
):
    from bench.paper_smoke import SMOKE, crops
    from histodiff_ray.config import load_config
    from histodiff_ray.ldm import LatentDiffusion

    regions = shared_data / "unlabeled"
    crops(regions / "gbm40-brain", tmp_path / "labeled" / "GBM", 3)
    crops(regions / "tcga-lgg-brain", tmp_path / "labeled" / "LGG", 3)
    overrides = s3_overrides + SMOKE + NARROW + FAST
    cfg = load_config("paper", overrides)
    assert (cfg.data.tile_size, cfg.autoencoder.latent_channels, cfg.diffusion.bf16) == (256, 3, True)
    workdir = f"s3://{bucket}/pipeline"
    work = open_location(workdir, cfg.storage)
    _, gcs, env = ray_head
    env = {**env, "RAY_ADDRESS": gcs}
    cmd = [str(BIN / "histodiff"), "pipeline", "--config", "paper", "--labeled", str(tmp_path / "labeled")]
    cmd += ["--workdir", workdir, *overrides]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and "autoencoder" not in _markers(work):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _markers(work)
    assert "autoencoder" in done_before and "evaluation" not in done_before, done_before

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in done_before:
        assert f"[pipeline] {stage}: done before" in rerun.stdout
    # Ray Train's error line about its own actor, at every training stage, stays off the console.
    assert "PreemptionWatcher" not in rerun.stdout + rerun.stderr
    stages = {"tiles-target", "autoencoder", "latents-target", "pretrain", "finetune"}
    stages |= {"judge", "synthetic", "fidelity", "evaluation"}
    assert set(_markers(work)) == stages | {"classifier"}
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["report"].endswith("report/report.html") and exists(open_location(result["report"], cfg.storage))
    # The rerun's full log is in the workdir (the killed run's, kept locally until the end, is not).
    (log,) = [name for name in list_files(work) if name.startswith("logs/pipeline-")]
    assert "[pipeline] evaluation: running" in read_bytes(work.join(log)).decode()

    # Classifier-free guidance on the same workdir: tiles, autoencoder, latents, pre-training and the
    # judge are reused; the fine-tune (now class-conditional) and everything after it run anew.
    cfree_cmd = cmd + ["guidance.kind=classifier_free"]
    cfree = subprocess.run(cfree_cmd, env=env, capture_output=True, text=True, timeout=900)
    assert cfree.returncode == 0, cfree.stderr[-3000:]
    for stage in ("tiles-target", "autoencoder", "latents-target", "pretrain", "judge"):
        assert f"[pipeline] {stage}: done before" in cfree.stdout
    for stage in ("finetune", "synthetic", "fidelity", "evaluation"):
        assert f"[pipeline] {stage}: done before" not in cfree.stdout
    assert [m for m in _markers(work) if m == "finetune"] == ["finetune", "finetune"]
    sets = {f.split("/")[0] for f in list_files(work) if f.startswith("synthetic-") and f.endswith("/summary.json")}
    assert len(sets) == 2 and all(json.loads(read_bytes(work.join(s, "summary.json")))["tiles"] == 2 for s in sets)
    # The classifier-free set: made by a UNet fine-tuned (in bf16) from the pre-trained run with a class
    # embedding (classes 0, 1 and the null class 2), at its own LR, guided by nothing else.
    (syn,) = [s for s in sets if "classifier_free" in read_bytes(work.join(s, "plan.json")).decode()]
    shard = work.join(syn, "shards", "GBM-00000.parquet")
    table = pq.read_table(shard.path, filesystem=shard.filesystem)
    assert set(table.column("guidance").to_pylist()) == {"classifier_free"}
    assert table.column("classifier").null_count == table.num_rows
    assert set(table.column("guidance_scale").to_pylist()) == {cfg.sampling.cfg_scale}
    ldm = open_location(json.loads(read_bytes(work.join(syn, "plan.json")))["sources"]["ldm"], cfg.storage)
    info = read_run_info(ldm)
    assert info["kind"] == "ldm" and info["classes"] == ["GBM", "LGG"] and "/pretrain-" in info["finetuned_from"]
    assert info["final_metrics"]["lr"] == cfg.diffusion.finetune_lr and LatentDiffusion.from_run(ldm).null_class == 2
    # Per class, borderless mosaics of kept and dropped tiles in generation order: 8 tiles a row, no padding.
    mosaics = [name for name in list_files(work.join(syn, "grids")) if name.startswith("GBM-")]
    assert mosaics and all(
        Image.open(io.BytesIO(read_bytes(work.join(syn, "grids", m)))).size == (8 * 256, 256) for m in mosaics
    )
