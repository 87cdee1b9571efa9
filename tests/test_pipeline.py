"""`histodiff pipeline` end to end on a tiny config, on the S3 server: killed after its autoencoder
stage, rerun to the report, skipping the stages it finished; a changed evaluate setting changes the
hash of the evaluation stage only."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from histodiff_ray.storage import exists, list_files, open_location, read_bytes
from tests.conftest import GEN, TINY
from tests.data.test_ingest import make_labeled_input

BIN = Path(sys.executable).parent
FAST = [
    "ray.num_workers=1",
    "evaluate.seeds=1",
    "evaluate.cpus_per_run=0.5",
    # Two downstream runs, not five: the pipeline's part is to hand the evaluation its inputs (every arm
    # is tested in tests/test_evaluate.py).
    "evaluate.arms=real+aug",
    "evaluate.synthetic_uses=mix",
    "generate.per_class=4",
    "sampling.ddim_steps=4",
    "diffusion.finetune_steps=2",
    "diffusion.finetune_warmup_steps=0",
]


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


def test_pipeline_resumes_after_a_kill_and_skips_finished_stages(
    s3, s3_overrides, bucket, shared_data, ray_head, tmp_path
):
    from histodiff_ray.config import load_config

    src = make_labeled_input(tmp_path / "input", shared_data, classes=("AC", "H"), per_class=24)
    overrides = s3_overrides + TINY + GEN + FAST
    cfg = load_config("cpu", overrides)
    workdir = f"s3://{bucket}/pipeline"
    work = open_location(workdir, cfg.storage)
    _, gcs, env = ray_head
    env = {**env, "RAY_ADDRESS": gcs}
    cmd = [str(BIN / "histodiff"), "pipeline", "--labeled", str(src), "--workdir", workdir, *overrides]

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
    assert set(_markers(work)) == {
        "tiles-target",
        "autoencoder",
        "latents-target",
        "pretrain",
        "finetune",
        "classifier",
        "judge",
        "synthetic",
        "fidelity",
        "evaluation",
    }
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["report"].endswith("report/report.html") and exists(open_location(result["report"], cfg.storage))
    # The rerun's full log is in the workdir (the killed run's, kept locally until the end, is not).
    (log,) = [name for name in list_files(work) if name.startswith("logs/pipeline-")]
    assert "[pipeline] evaluation: running" in read_bytes(work.join(log)).decode()
