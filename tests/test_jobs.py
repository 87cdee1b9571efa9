"""The thin `jobs/` entrypoints, submitted with `ray job submit` to a real local head node."""

import subprocess
import sys
from pathlib import Path

import pytest

from histodiff_ray.config import load_config
from histodiff_ray.data.tiles import load_manifest
from histodiff_ray.storage import open_location

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ingest_job_runs_under_ray_job_submit(ray_head, s3, bucket, shared_data):
    address, _, env = ray_head
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/ingest.py",
        "--config",
        "configs/cpu.yaml",
        "--input",
        str(shared_data / "nct9" / "fewshot"),
        "--labeled",
        "--output",
        f"s3://{bucket}/job-tiles",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(
        "cpu",
        [
            f"storage.endpoint_url={s3.endpoint_url}",
            f"storage.access_key_id={s3.access_key}",
            f"storage.secret_access_key={s3.secret_key}",
        ],
    )
    manifest = load_manifest(open_location(f"s3://{bucket}/job-tiles", cfg.storage))
    n_files = len(list((shared_data / "nct9" / "fewshot").rglob("*.png")))
    assert manifest["kept"] == n_files and len(manifest["classes"]) == 9


def test_cli_help_explains_every_subcommand():
    out = subprocess.run([str(BIN / "histodiff"), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("ingest", "stream", "demo"):
        assert name in out
    ingest_help = subprocess.run(
        [str(BIN / "histodiff"), "ingest", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--input", "--output", "--labeled", "--mpp", "KEY=VALUE", "quarantined"):
        assert flag in ingest_help


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.py")))
def test_every_job_entrypoint_runs_its_stage(job):
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--config" in out.stdout and "KEY=VALUE" in out.stdout


def test_no_job_file_shadows_a_standard_module():
    """`python jobs/X.py` puts jobs/ first on sys.path: a jobs/select.py would replace the standard
    library's `select` for everything the job imports."""
    assert not {p.stem for p in (REPO / "jobs").glob("*.py")} & set(sys.stdlib_module_names)
