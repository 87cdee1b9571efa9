"""The cluster configs in cluster/: they parse, pin the project's Ray and Python, run job commands the
real CLI accepts, and fit the `paper` profile. No network, no kubectl, no AWS."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import re
import shlex
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from histodiff_ray.cli import build_parser
from histodiff_ray.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
AWS = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RUNTIME_ENV = KUBERAY / "runtime-env.yaml"
README = CLUSTER / "README.md"
RAYJOBS = {stage: KUBERAY / f"rayjob-{stage}.yaml" for stage in ("pretrain", "generate", "sweep")}
KUBERAY_CLUSTERS = [RAYCLUSTER, *RAYJOBS.values()]
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
# A stage whose job is added by another issue: its entrypoint is checked once its CLI exists.
PENDING_STAGES = {"sweep"}

# vCPUs and NVIDIA GPUs of the EC2 instance types the launcher config may use (AWS's published
# specs). A type missing here fails the test: add it with its real numbers.
EC2_TYPES = {
    "m5.large": (2, 0),
    "m5.xlarge": (4, 0),
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "m5.8xlarge": (32, 0),
    "r5.2xlarge": (8, 0),
    "r5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g5.8xlarge": (32, 1),
    "g5.16xlarge": (64, 1),
    "g5.12xlarge": (48, 4),
    "g5.24xlarge": (96, 4),
    "g5.48xlarge": (192, 8),
    "g6.4xlarge": (16, 1),
    "g6.12xlarge": (48, 4),
    "g6.48xlarge": (192, 8),
    "p3.8xlarge": (32, 4),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}


# ---------------------------------------------------------------- helpers


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@functools.cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pinned_ray() -> str:
    """The version in pyproject's `ray[...]==X.Y.Z` dependency."""
    pins = [
        m.group(2)
        for d in _pyproject()["dependencies"]
        if (m := re.fullmatch(r"ray(\[[^\]]*\])?==([0-9][0-9.]*)", d.replace(" ", "")))
    ]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once with ==, found {pins}"
    return pins[0]


def _pinned_python() -> str:
    """The Python the project targets: the lower bound of requires-python (">=3.11" -> "3.11")."""
    m = re.search(r">=\s*(\d+\.\d+)", _pyproject()["requires-python"])
    assert m, f"requires-python {_pyproject()['requires-python']!r} has no >= lower bound"
    return m.group(1)


def _non_ray_dependencies() -> set[str]:
    return {d.replace(" ", "") for d in _pyproject()["dependencies"] if not re.match(r"ray(\[|=|<|>|$)", d)}


def _walk(node, path=()):
    """Yield (key path, value) for every scalar in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))
    else:
        yield path, node


@functools.cache
def _paper() -> Config:
    return load_config(str(REPO / "configs" / "paper.yaml"))


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(q) -> float:
    """A Kubernetes quantity as a number: 10, "10", "500m", "40Gi"."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q).strip())
    assert m and m.group(2) in ("", *_SUFFIXES), f"not a Kubernetes quantity: {q!r}"
    return float(m.group(1)) * _SUFFIXES.get(m.group(2), 1)


def _fit_problem(
    what: str, n: int, cpus_each: float, gpus_each: float, node_cpus: float, node_gpus: float, max_nodes: int
) -> str | None:
    """Why `n` GPU workers of {CPU: cpus_each, GPU: gpus_each} do not fit `max_nodes` nodes of
    {CPU: node_cpus, GPU: node_gpus} with at least one CPU per node left for Ray Data (the head
    offers none), or None when they fit."""
    per_node = int(node_gpus // gpus_each)
    if per_node == 0:
        return f"{what}: a node has {node_gpus} GPU(s), one worker needs {gpus_each}"
    spare = node_cpus - per_node * cpus_each
    if spare < 1:
        return (
            f"{what}: {per_node} worker(s) per node × {cpus_each} CPUs leave {spare:g} of the node's "
            f"{node_cpus:g} CPUs for Ray Data; at least 1 must stay free"
        )
    if per_node * max_nodes < n:
        return f"{what}: at most {max_nodes} node(s) × {per_node} worker(s) = {per_node * max_nodes} < {n} workers"
    return None


def _aws_gpu_types() -> dict[str, tuple[float, float, int]]:
    """name -> (CPUs, GPUs, max_workers) of the AWS worker types that offer GPUs."""
    cfg = _load(AWS)
    out = {}
    for name, nt in cfg["available_node_types"].items():
        if name != cfg["head_node_type"] and nt.get("resources", {}).get("GPU", 0) > 0:
            out[name] = (nt["resources"]["CPU"], nt["resources"]["GPU"], nt["max_workers"])
    return out


def _cluster_spec(path: Path) -> dict:
    doc = _load(path)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in a pod of this group: rayStartParams win over the container limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def _kuberay_gpu_groups(path: Path) -> dict[str, tuple[float, float, int]]:
    """groupName -> (CPUs, GPUs, maxReplicas) of the worker groups that offer GPUs."""
    out = {}
    for g in _cluster_spec(path)["workerGroupSpecs"]:
        cpus, gpus = _ray_resources(g)
        if gpus > 0:
            out[g["groupName"]] = (cpus, gpus, g["maxReplicas"])
    return out


def _fit_everywhere(label: str, n: int, cfg: Config) -> list[str]:
    """Problems placing `n` GPU workers of `cfg`'s shape on each AWS GPU type and KubeRay GPU group."""
    problems = []
    shape = (cfg.ray.cpus_per_worker, cfg.ray.gpus_per_worker)
    for name, (cpus, gpus, max_nodes) in _aws_gpu_types().items():
        problems.append(_fit_problem(f"aws.yaml {name}: {label}", n, *shape, cpus, gpus, max_nodes))
    for path in KUBERAY_CLUSTERS:
        for name, (cpus, gpus, max_nodes) in _kuberay_gpu_groups(path).items():
            problems.append(_fit_problem(f"{path.name} {name}: {label}", n, *shape, cpus, gpus, max_nodes))
    return [p for p in problems if p]


def _job_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python jobs/X.py ...` command in cluster/: the RayJob
    entrypoints and the commands in the README's code blocks (continuation lines joined)."""
    out = [(f"{p.name}:entrypoint", _load(p)["spec"]["entrypoint"]) for p in RAYJOBS.values()]
    in_block, pending, start = False, "", 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = pending + line, ""
        for m in re.finditer(r"(?<![\w/.-])python3? jobs/", command):
            out.append((f"README.md:{start}", command[m.start() :]))
    return out


def _split_command(command: str) -> tuple[str, list[str]]:
    """'python jobs/x.py --a b  # note && more' -> ('jobs/x.py', ['--a', 'b'])."""
    tokens = shlex.split(command, comments=True)
    for i, t in enumerate(tokens):
        if t in ("&&", "||", ";", "|", "&"):
            tokens = tokens[:i]
            break
    assert tokens[0] in ("python", "python3") and tokens[1].startswith("jobs/"), tokens
    return tokens[1], tokens[2:]


def _subcommand_of(job: Path) -> str:
    """The subcommand a jobs/ entrypoint runs: the first item of the list it passes to main()."""
    for node in ast.walk(ast.parse(job.read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "main"
            and node.args
            and isinstance(node.args[0], ast.List)
            and node.args[0].elts
            and isinstance(node.args[0].elts[0], ast.Constant)
        ):
            return node.args[0].elts[0].value
    raise AssertionError(f"{job} does not call main([SUBCOMMAND, *sys.argv[1:]])")


def _cli_subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("histodiff_ray.cli.build_parser() has no subcommands")


def _storage_env_vars() -> set[str]:
    """The environment variables histodiff_ray/storage.py reads for S3 settings."""
    names = set(re.findall(r"env\.get\(\s*[\"']([A-Z0-9_]+)[\"']", (REPO / "histodiff_ray" / "storage.py").read_text()))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, names
    return names


# ---------------------------------------------------------------- files and versions


def test_cluster_files_exist():
    for path in (AWS, RAYCLUSTER, RUNTIME_ENV, README, *RAYJOBS.values(), CLUSTER / "package_working_dir.py"):
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected YAML mappings"
    for doc in docs:
        if doc.get("kind") == "RayJob":
            env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert isinstance(env, dict), f"{path.name}: runtimeEnvYAML must be a YAML mapping"


def test_aws_config_passes_rays_own_validation():
    """The launcher's schema (ray-schema.json of the pinned Ray) and its consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(AWS)))


def test_images_and_ray_versions_match_pyproject():
    ray_version, python = _pinned_ray(), _pinned_python()
    import ray

    assert ray.__version__ == ray_version, "the test's own Ray differs from pyproject.toml; reinstall the venv"
    refs = []
    for path in TEXT_FILES:  # YAML fields, Dockerfile FROM lines and README mentions alike
        for tag in re.findall(r"rayproject/ray[\w-]*:([^\s\"'`),]+)", path.read_text()):
            refs.append((path.name, tag))
            m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:\.[0-9a-f]+)?-py(\d)(\d+)(?:-[\w.]+)?", tag)
            assert m, f"{path.name}: image tag {tag!r} does not name a Ray version and a pyXY Python"
            assert m.group(1) == ray_version, (
                f"{path.name}: image tag {tag!r} is not Ray {ray_version} (pyproject.toml)"
            )
            assert f"{m.group(2)}.{m.group(3)}" == python, f"{path.name}: image tag {tag!r} is not Python {python}"
    assert refs, "no rayproject/ray image found in cluster/"

    for path in YAML_FILES:
        if path == RUNTIME_ENV:
            continue
        images = [v for keys, v in _walk(_load(path)) if keys and keys[-1] in ("image", "head_image", "worker_image")]
        assert images, f"{path.name}: names no image"
        for image in images:
            assert image.startswith("rayproject/ray:"), (
                f"{path.name}: image {image!r} is not a pinned rayproject/ray image"
            )
    dockerfile = CLUSTER / "Dockerfile"
    if dockerfile.exists():
        assert re.search(r"^FROM rayproject/ray:", dockerfile.read_text(), re.M), (
            "cluster/Dockerfile must build FROM rayproject/ray"
        )
    for path in KUBERAY_CLUSTERS:
        assert str(_cluster_spec(path)["rayVersion"]) == ray_version, f"{path.name}: rayVersion is not {ray_version}"


def test_runtime_envs_install_exactly_the_pinned_dependencies():
    envs = {RUNTIME_ENV.name: _load(RUNTIME_ENV)}
    for path in RAYJOBS.values():
        env = yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])
        envs[path.name] = env
        wd = env.get("working_dir", "")
        assert re.match(r"(s3|https?|gs)://.+\.zip$", wd), f"{path.name}: working_dir {wd!r} must be a remote .zip URI"
    assert "working_dir" not in envs[RUNTIME_ENV.name], "runtime-env.yaml: `--working-dir .` supplies the code"
    for name, env in envs.items():
        pip = env.get("pip")
        packages = pip.get("packages") if isinstance(pip, dict) else pip
        assert packages, f"{name}: no pip packages"
        got = {p.replace(" ", "") for p in packages}
        assert not any(re.match(r"ray(\[|=|<|>|$)", p) for p in got), f"{name}: do not reinstall ray in a runtime env"
        assert got == _non_ray_dependencies(), (
            f"{name}: pip list differs from pyproject.toml's dependencies (without ray): "
            f"missing {sorted(_non_ray_dependencies() - got)}, extra {sorted(got - _non_ray_dependencies())}"
        )


def test_aws_nodes_install_the_project_from_file_mounts():
    cfg = _load(AWS)
    from_repo = [remote for remote, local in (cfg.get("file_mounts") or {}).items() if local in (".", "./")]
    assert from_repo, "aws.yaml: file_mounts must ship the repository root (pyproject.toml) to the nodes"
    installs = [c for c in cfg.get("setup_commands", []) if re.search(r"\bpip install\b", c)]
    assert any(remote.rstrip("/") in c for c in installs for remote in from_repo), (
        f"aws.yaml: no setup command pip-installs the mounted project ({from_repo}); installs: {installs}"
    )
    assert ".gitignore" in (cfg.get("rsync_filter") or []), (
        "aws.yaml: rsync_filter .gitignore keeps .venv off the nodes"
    )


# ---------------------------------------------------------------- job commands


def test_every_referenced_job_exists():
    referenced = {
        (p.name, name) for p in TEXT_FILES for name in re.findall(r"\bjobs/([A-Za-z0-9_]+)\.py", p.read_text())
    }
    assert referenced
    missing = sorted((f, n) for f, n in referenced if not (JOBS / f"{n}.py").is_file() and n not in PENDING_STAGES)
    assert not missing, f"cluster files reference jobs that do not exist: {missing}"


def test_each_rayjob_runs_its_own_stage():
    for stage, path in RAYJOBS.items():
        job, _ = _split_command(_load(path)["spec"]["entrypoint"])
        assert job == f"jobs/{stage}.py", f"{path.name} runs {job}, expected jobs/{stage}.py"


@pytest.mark.parametrize(("where", "command"), _job_commands(), ids=[w for w, _ in _job_commands()])
def test_job_command_is_accepted_by_the_real_cli(where, command, monkeypatch, capsys):
    job, args = _split_command(command)
    path = REPO / job
    stage = path.stem
    subcommand = _subcommand_of(path) if path.is_file() else stage.replace("_", "-")
    missing = [
        m
        for m, absent in (
            (job, not path.is_file()),
            (f"`histodiff {subcommand}` in histodiff_ray.cli.build_parser()", subcommand not in _cli_subcommands()),
        )
        if absent
    ]
    if missing:
        assert stage in PENDING_STAGES, f"{where}: missing {' and '.join(missing)}"
        pytest.skip(
            f"{' and '.join(missing)} not there yet (another engineer adds the {stage} stage): "
            f"{where} references {job}, its arguments are not parsed until then"
        )

    try:
        parsed = build_parser().parse_args([subcommand, *args])
    except SystemExit:
        pytest.fail(f"{where}: `histodiff {subcommand}` rejects {args}: {capsys.readouterr().err.strip()}")
    assert parsed.command == subcommand

    # The job's cwd is the working dir (the repository, or the zip made from it).
    monkeypatch.chdir(REPO)
    if parsed.config.endswith((".yaml", ".yml")):
        assert (REPO / parsed.config).is_file(), f"{where}: --config {parsed.config} does not exist"
    for override in parsed.overrides:
        key = override.split("=", 1)[0]
        assert key not in ("storage.access_key_id", "storage.secret_access_key"), (
            f"{where}: S3 keys on a job's command line are shown by the dashboard; use the cluster's credentials"
        )
    cfg = load_config(parsed.config, parsed.overrides)

    if cfg.ray.use_gpu:
        problems = _fit_everywhere(f"{where} Train workers", cfg.ray.num_workers, cfg)
        if subcommand == "generate":
            problems += _fit_everywhere(f"{where} generate actors", cfg.generate.actors, cfg)
        if subcommand == "encode-latents":
            problems += _fit_everywhere(f"{where} encoder actors", parsed.actors, cfg)
        if subcommand == "sweep":  # sweep.concurrency trials at once, each with its own generate actor pool
            problems += _fit_everywhere(
                f"{where} concurrent trials' generate actors", cfg.sweep.concurrency * cfg.generate.actors, cfg
            )
        assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- resources


def test_aws_head_has_no_work_and_gpu_workers_fit_the_paper_profile():
    cfg = _load(AWS)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    for name, nt in types.items():
        itype = nt["node_config"]["InstanceType"]
        assert itype in EC2_TYPES, f"aws.yaml {name}: add {itype}'s vCPUs and GPUs to EC2_TYPES"
        assert "IamInstanceProfile" in nt["node_config"], f"aws.yaml {name}: S3 access needs an IAM instance profile"
    head_res = head.get("resources", {})
    assert head_res.get("CPU") == 0, (
        "aws.yaml: the head must advertise CPU: 0 (no Train workers, actors or Ray Data tasks)"
    )
    assert head_res.get("GPU", 0) == 0 and EC2_TYPES[head["node_config"]["InstanceType"]][1] == 0, (
        "aws.yaml: the head must have no GPU"
    )

    for name, nt in types.items():
        if nt is head:
            continue
        vcpus, gpus = EC2_TYPES[nt["node_config"]["InstanceType"]]
        res = nt.get("resources", {})
        assert 0 < res.get("CPU", 0) <= vcpus, f"aws.yaml {name}: declare resources.CPU (1..{vcpus} vCPUs)"
        assert res.get("GPU", 0) == gpus, f"aws.yaml {name}: resources.GPU must be the instance's {gpus} GPU(s)"
        assert 0 <= nt.get("min_workers", 0) <= nt["max_workers"], f"aws.yaml {name}: min_workers > max_workers"
        assert nt["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", (
            f"aws.yaml {name}: workers run on spot"
        )

    gpu_types = _aws_gpu_types()
    assert gpu_types, "aws.yaml: no worker type offers GPUs"
    paper = _paper()
    assert paper.ray.use_gpu
    for label, n in (("Train workers", paper.ray.num_workers), ("generate actors", paper.generate.actors)):
        for name, (cpus, gpus, max_nodes) in gpu_types.items():
            problem = _fit_problem(
                f"aws.yaml {name}: paper {label}",
                n,
                paper.ray.cpus_per_worker,
                paper.ray.gpus_per_worker,
                cpus,
                gpus,
                max_nodes,
            )
            assert problem is None, problem
            nodes = -(-n // int(gpus // paper.ray.gpus_per_worker))
            assert cfg["max_workers"] >= nodes, (
                f"aws.yaml: max_workers {cfg['max_workers']} < the {nodes} {name} nodes paper {label} need"
            )


@pytest.mark.parametrize("path", KUBERAY_CLUSTERS, ids=lambda p: p.name)
def test_kuberay_resources(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(path)
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-cpus")) == "0", f'{path.name}: the head needs num-cpus: "0"'
    assert str(head["rayStartParams"].get("num-gpus", "0")) == "0", f"{path.name}: the head must offer no GPU"
    groups = [("head", head), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            limits, requests = res.get("limits", {}), res.get("requests", {})
            assert limits and requests, f"{path.name} {name}/{c['name']}: set resources requests and limits"
            for key in set(limits) | set(requests):
                assert key in limits and key in requests and _quantity(limits[key]) == _quantity(requests[key]), (
                    f"{path.name} {name}/{c['name']}: {key} request {requests.get(key)} != limit {limits.get(key)}"
                )
            if name == "head":
                assert "nvidia.com/gpu" not in limits, f"{path.name}: the head requests a GPU"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (
            f"{path.name} {g['groupName']}: replicas"
        )
        if "gpu" in g["groupName"].lower():
            assert _ray_resources(g)[1] > 0, (
                f"{path.name} {g['groupName']}: a GPU worker group must request nvidia.com/gpu"
            )
    assert _kuberay_gpu_groups(path), f"{path.name}: no worker group requests GPUs"

    paper = _paper()
    for label, n in (("Train workers", paper.ray.num_workers), ("generate actors", paper.generate.actors)):
        for name, (cpus, gpus, max_nodes) in _kuberay_gpu_groups(path).items():
            problem = _fit_problem(
                f"{path.name} {name}: paper {label}",
                n,
                paper.ray.cpus_per_worker,
                paper.ray.gpus_per_worker,
                cpus,
                gpus,
                max_nodes,
            )
            assert problem is None, problem


def test_rayjobs_use_the_raycluster_spec_and_clean_up():
    reference = _load(RAYCLUSTER)["spec"]
    for path in RAYJOBS.values():
        doc = _load(path)
        assert doc["kind"] == "RayJob"
        assert doc["spec"]["rayClusterSpec"] == reference, (
            f"{path.name}: rayClusterSpec differs from raycluster.yaml's spec"
        )
        assert doc["spec"].get("shutdownAfterJobFinishes") is True, (
            f"{path.name}: shutdownAfterJobFinishes must be true"
        )
        ttl = doc["spec"].get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl >= 0, f"{path.name}: ttlSecondsAfterFinished must be a number of seconds"


# ---------------------------------------------------------------- credentials


@pytest.mark.parametrize("path", KUBERAY_CLUSTERS, ids=lambda p: p.name)
def test_kuberay_s3_settings_come_from_a_secret(path):
    known = _storage_env_vars()
    spec = _cluster_spec(path)
    for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert name in env, f"{path.name} {c['name']}: {name} is not set"
            for name, e in env.items():
                if name.startswith(("AWS_", "HISTODIFF_")):
                    assert name in known, (
                        f"{path.name}: {name} is not read by histodiff_ray/storage.py (it reads {sorted(known)})"
                    )
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (
                        f"{path.name}: {name} must come from a Secret (valueFrom.secretKeyRef), not a literal value"
                    )


SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    # KEY=VALUE / key: value with a key-like value (placeholders such as "..." pass)
    re.compile(r"(?i)(secret_access_key|access_key_id|session_token)[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+=]{16,}"),
    re.compile(r"aws_secret_access_key[ \t]*="),  # the ~/.aws/credentials spelling
]


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_access_keys_in_cluster_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        m = pattern.search(text)
        assert not m, f"{path.name}: looks like a credential: {m.group(0)[:24]}…"
    m = re.search(r"storage\.(access_key_id|secret_access_key)=(?!\.\.\.)\S", text)
    assert not m, f"{path.name}: S3 keys as a config override: {m.group(0)}"


def test_aws_config_carries_no_keys():
    """S3 access on AWS is the instance profiles' job: no credential variables anywhere in the file."""
    for keys, value in _walk(_load(AWS)):
        if isinstance(value, str):
            assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\s*=", value), (
                f"aws.yaml {keys}: sets AWS keys"
            )
        assert not any(isinstance(k, str) and re.search(r"(?i)secret|access_?key", k) for k in keys), (
            f"aws.yaml: key {keys}"
        )


# ---------------------------------------------------------------- the RayJobs' working dir


def test_working_dir_zip_unpacks_with_the_entrypoints_files(tmp_path, monkeypatch):
    from ray._private.runtime_env.packaging import unzip_package

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in cluster/
    spec = importlib.util.spec_from_file_location("package_working_dir", CLUSTER / "package_working_dir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(tmp_path / "build" / "wd.zip")
    with zipfile.ZipFile(built) as zf:
        names = zf.namelist()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], "caches in the zip"
    assert len({n.split("/", 1)[0] for n in names}) == 1, "Ray wants a single top-level folder in a working_dir zip"

    # Unpack it the way Ray does for a remote working_dir.
    shutil.copy(built, tmp_path / "pkg.zip")
    wd = tmp_path / "wd"
    unzip_package(
        package_path=str(tmp_path / "pkg.zip"), target_dir=str(wd), remove_top_level_directory=True, unlink_zip=True
    )
    for path in RAYJOBS.values():
        job, args = _split_command(_load(path)["spec"]["entrypoint"])
        if (REPO / job).is_file():
            assert (wd / job).is_file(), f"{path.name}: {job} is not in the working_dir zip"
        config = args[args.index("--config") + 1]
        assert (wd / config).is_file() and not (wd / config).is_symlink(), f"{path.name}: {config} is not in the zip"
        assert (wd / config).read_bytes() == (REPO / config).read_bytes()
    assert (wd / "histodiff_ray" / "cli.py").is_file()
