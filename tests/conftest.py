"""Session fixtures: one real S3 server (SeaweedFS on loopback, credentials enforced), one local
Ray cluster, and the real H&E data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s and waits a poll at each state change, so a
# 2-step tiny run spends seconds idle; polling at 0.25 s made tests/train/test_autoencoder.py 12 %
# faster (199 -> 175 s). Propagated to the `ray start` cluster's drivers through their environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; skipped when absent, a failure when HISTODIFF_REQUIRE_DATA=1 (as in CI)."""
    if not (DATA / "crc5" / "train").is_dir():
        message = f"real H&E data not found at {DATA} (set HISTODIFF_SHARED_DATA to its folder)"
        if os.environ.get("HISTODIFF_REQUIRE_DATA") == "1":
            pytest.fail(message + "; HISTODIFF_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(message)
    return DATA


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from histodiff_ray.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_overrides(s3) -> list[str]:
    """Config overrides that point the storage layer at the test S3 server."""
    return [
        f"storage.endpoint_url={s3.endpoint_url}",
        f"storage.access_key_id={s3.access_key}",
        f"storage.secret_access_key={s3.secret_key}",
        "storage.retries=2",
    ]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


_bucket_counter = iter(range(10_000))


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"test-{os.getpid()}-{next(_bucket_counter)}"
    s3.create_bucket(name)
    return name


# Tiny model settings for integration tests: one Train worker, a few steps, a small UNet.
TINY = [
    "data.batch_size=8",
    "ray.num_workers=1",
    "autoencoder.max_steps=2",
    "autoencoder.decoder_steps=0",
    "autoencoder.gan_steps=0",
    "autoencoder.checkpoint_every=2",
    "autoencoder.log_every=1",
    "diffusion.checkpoint_every=2",
    "diffusion.log_every=1",
    "diffusion.warmup_steps=2",
    "unet.base_channels=32",
    "unet.channel_mult=1,2",
    "unet.attention_resolutions=2",
]


# Two Train workers, for the runs whose point includes DDP (gradients synced, a shard each, one worker
# killed): a second worker costs each Train run about 5 s of start-up on 2 cores, so the others use one.
DDP = ["ray.num_workers=2"]


@pytest.fixture(scope="session")
def tiny_latents(ray_local, s3, s3_overrides, tmp_path_factory, shared_data):
    """Real crc5 tiles (2 classes × 24) ingested to the S3 server, an autoencoder (2 joint steps, then
    2 of the decoder alone and 2 adversarial ones, on two DDP workers) and their latents, shared by the training and
    generation tests. Returns (config overrides, bucket)."""
    from histodiff_ray.config import load_config
    from histodiff_ray.data.ingest import ingest
    from histodiff_ray.data.latents import encode_latents
    from histodiff_ray.train.autoencoder import train_autoencoder
    from tests.data.test_ingest import make_labeled_input

    bucket = "train-runs"
    s3.create_bucket(bucket)
    overrides = s3_overrides + TINY
    cfg = load_config("cpu", overrides)
    src = make_labeled_input(tmp_path_factory.mktemp("train") / "input", shared_data, classes=("AC", "H"), per_class=24)
    ingest(cfg, [str(src)], f"s3://{bucket}/tiles", labeled=True, progress=False)
    # Both decoder phases (2 steps each) are checked in tests/train/test_autoencoder.py from this run's
    # checkpoints, one per phase: one Train run serves both.
    decoder_phases = ["autoencoder.decoder_steps=2", "autoencoder.gan_steps=2", "autoencoder.gan_channels=8"]
    ae_cfg = load_config("cpu", overrides + DDP + decoder_phases + ["ray.keep_checkpoints=3"])
    info = train_autoencoder(ae_cfg, [f"s3://{bucket}/tiles"], f"s3://{bucket}/runs/ae")
    assert info["step"] == 6 and info["final_metrics"]["val_tiles"] > 0
    assert 0 < info["final_metrics"]["val_ssim"] < 1 and info["final_metrics"]["val_psnr"] > 5
    from histodiff_ray.storage import exists, open_location

    assert exists(
        open_location(f"s3://{bucket}/runs/ae", cfg.storage).join("reconstructions.png")
    )  # real | reconstruction
    manifest = encode_latents(cfg, f"s3://{bucket}/tiles", f"s3://{bucket}/runs/ae/model/vae", f"s3://{bucket}/latents")
    assert (
        manifest["rows"] == 48
        and manifest["latent_shape"] == [cfg.autoencoder.latent_channels, 16, 16]
        and manifest["scale_factor"] > 0
    )
    return overrides, bucket


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3):
    """`ray start --head` on unique ports, as on a real cluster; the cluster's environment carries
    the S3 settings, as an instance role or cluster secret would. Yields (dashboard URL, GCS
    address, environment for clients)."""
    import signal
    import subprocess
    import sys
    import time

    bin_dir = Path(sys.executable).parent
    temp_dir = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, **s3.env(), "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for attempt in range(3):  # a port found free may be taken before Ray binds it: new ports, once more
        gcs, dashboard, client, agent_listen, agent_grpc, metrics, node_manager, object_manager, env_agent = (
            _free_ports(9)
        )
        # Every worker process holds a port while it lives. 20 ports ran out during a training stage (a Train
        # run starts ~8 actors beside the idle workers): the raylet then waited its 60 s register timeout
        # for the worker that found no port, once in most pipeline runs. 200 per cluster, below Linux's
        # ephemeral range (32768 up): one of 60 windows, picked by process id.
        worker_lo = 20000 + (os.getpid() + 97 * attempt) % 60 * 200
        cmd = [
            str(bin_dir / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--runtime-env-agent-port={env_agent}",
            f"--min-worker-port={worker_lo}",
            f"--max-worker-port={worker_lo + 199}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--dashboard-host=127.0.0.1",
        ]
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode == 0:
            break
    else:
        pytest.fail(
            f"ray start --head failed 3 times; last output:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}"
        )
    yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env

    # `ray stop` would stop every cluster on the machine; end only this one's processes: those started
    # with its temp dir and their descendants (the raylet's agents rename themselves "ray::…", lose the
    # temp dir from their command line and outlived the suite when only the first were killed).
    def children(pid: str) -> list[str]:
        return subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()

    tree, todo = set(), subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children(pid)
    for pid in tree:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)


# Settings for the synthesis tests: a 2-step LDM, a tiny guide, a 2-epoch judge, shards of 2 tiles.
GEN = [
    "diffusion.max_steps=2",
    "classifier.width=32",
    "classifier.channel_mult=1,2",
    "classifier.attention_resolutions=2",
    "classifier.max_steps=4",
    "classifier.checkpoint_every=4",
    "classifier.log_every=2",
    "classifier.warmup_steps=0",
    "downstream.epochs=2",
    "downstream.batch_size=16",
    "generate.shard_size=2",
    "generate.actors=2",
    "sampling.ddim_steps=20",
    "selection.confidence_threshold=0.5",
    "generate.compile=false",
]


@pytest.fixture(scope="session")
def tiny_models(tiny_latents):
    """A 2-step latent diffusion run, the classifier that guides it and the judge, on the S3 server;
    ``leftover_checkpoints`` lists the local checkpoint folders their training left behind."""
    import glob
    import tempfile

    from histodiff_ray.config import load_config
    from histodiff_ray.judge import train_judge
    from histodiff_ray.train.diffusion import pretrain
    from histodiff_ray.train.guide import train_classifier

    overrides, bucket = tiny_latents
    overrides = overrides + GEN
    cfg = load_config("cpu", overrides)
    root = f"s3://{bucket}/gen"
    checkpoints = os.path.join(tempfile.gettempdir(), "ckpt-*")  # where the Train workers (this machine) write them
    before = set(glob.glob(checkpoints))
    pretrain(cfg, [(f"s3://{bucket}/latents", 1.0)], f"{root}/ldm")
    info = train_classifier(
        load_config("cpu", overrides + DDP), f"s3://{bucket}/latents", f"{root}/ldm", f"{root}/classifier"
    )
    leftover = sorted(set(glob.glob(checkpoints)) - before)
    judge = train_judge(cfg, f"s3://{bucket}/tiles", f"{root}/judge")
    args = {
        "ldm": f"{root}/ldm",
        "classifier": f"{root}/classifier",
        "judge": f"{root}/judge",
        "tiles": f"s3://{bucket}/tiles",
    }
    return {
        "overrides": overrides,
        "root": root,
        "args": args,
        "autoencoder": f"s3://{bucket}/runs/ae",
        "classifier_info": info,
        "judge": judge,
        "leftover_checkpoints": leftover,
    }


SYNTHETIC_PER_CLASS = 12  # shards of 2: enough for tests/test_generate.py's drill to kill its rerun half-way


@pytest.fixture(scope="session")
def tiny_synthetic(tiny_models):
    """A finished synthetic set (2 classes × 12 tiles) from the tiny models; also the uninterrupted set
    that tests/test_generate.py's drill compares its killed and rerun job with."""
    from histodiff_ray.config import load_config
    from histodiff_ray.generate import generate

    cfg = load_config("cpu", tiny_models["overrides"])
    uri = f"{tiny_models['root']}/synthetic-small"
    generate(cfg, **tiny_models["args"], output=uri, per_class=SYNTHETIC_PER_CLASS, progress=False)
    return uri


@pytest.fixture(scope="session")
def external_test_set(tmp_path_factory, shared_data) -> Path:
    """An external test set laid out as class folders: 5 crc5 tiles of AC and of H that the tiny
    tile set does not hold, one AC tile that it does (to be counted as such) and one truncated JPEG
    (to be quarantined)."""
    from tests.data.test_ingest import make_labeled_input

    crc5 = shared_data / "crc5" / "train"
    root = make_labeled_input(
        tmp_path_factory.mktemp("external") / "heldout", shared_data, classes=("AC", "H"), per_class=5, offset=1000
    )
    (root / "AC" / "also_in_the_tile_set.jpg").write_bytes(sorted((crc5 / "AC").glob("*.jpg"))[0].read_bytes())
    (root / "H" / "truncated.jpg").write_bytes((crc5 / "H" / "train_image_H_0.jpg").read_bytes()[:300])
    return root


EVALUATE = [
    "evaluate.seeds=2",
    "evaluate.cpus_per_run=0.5",
    "evaluate.label_fractions=0.5,1.0",
    "evaluate.pseudo_label_threshold=0.5",
]


@pytest.fixture(scope="session")
def tiny_evaluation(tiny_models, tiny_synthetic, external_test_set):
    """`evaluate` on the tiny tile set (all train labels usable) at label fractions 0.5 and 1 with the
    tiny synthetic set: 7 arms × 2 seeds, scored on the test split and an external test set."""
    from histodiff_ray.config import load_config
    from histodiff_ray.evaluate import evaluate

    cfg = load_config("cpu", tiny_models["overrides"] + EVALUATE)
    out = f"{tiny_models['root']}/eval"
    result = evaluate(
        cfg,
        tiny_models["args"]["tiles"],
        out,
        synthetic={"tiny": tiny_synthetic},
        judge=tiny_models["args"]["judge"],
        tests={"heldout": str(external_test_set)},
    )
    return out, result
