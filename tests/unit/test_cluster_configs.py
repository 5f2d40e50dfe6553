"""The shipped cluster files: Ray cluster-launcher YAMLs, the Dockerfile, the KubeRay RayJobs.

The launcher YAMLs are checked against the JSON schema that the installed `ray` package ships (the one
`ray up` uses) and through Ray's own `prepare_config` + `validate_config`; then for what no schema can see:
the head runs no work, GPU groups scale from zero, the image really is built from cluster/Dockerfile, the
dashboard listens on localhost only, and no file carries a secret.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_YAMLS = {"aws": ROOT / "cluster" / "aws.yaml", "gcp": ROOT / "cluster" / "gcp.yaml"}
RAYJOBS = {
    "finetune": (ROOT / "cluster" / "kuberay" / "rayjob.yaml", "jobs/finetune.py",
                 "configs/finetune/otterhd_8b_zero2.yaml"),
    "evaluate": (ROOT / "cluster" / "kuberay" / "rayjob-eval.yaml", "jobs/evaluate.py",
                 "configs/benchmark/magnifierbench_seed.yaml"),
}
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
GPU_INSTANCE = {"aws": "p5.48xlarge", "gcp": "a3-highgpu-8g"}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def _instance_type(provider: str, node_config: dict[str, Any]) -> str:
    return node_config["InstanceType"] if provider == "aws" else node_config["machineType"]


# ------------------------------------------------------------------------------ cluster launcher YAMLs
@pytest.fixture(params=sorted(LAUNCHER_YAMLS))
def launcher(request) -> tuple[str, dict[str, Any]]:
    return request.param, _load(LAUNCHER_YAMLS[request.param])


def test_launcher_yaml_matches_rays_own_schema(launcher):
    _, cfg = launcher
    jsonschema.validate(cfg, _ray_schema())


def test_launcher_yaml_passes_rays_config_validation(launcher):
    # What `ray up` runs before touching the cloud: defaults filled in, then schema + cross-field checks
    # (head_node_type exists, sum of min_workers <= max_workers, ...).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher[1])))


def test_schema_check_is_not_vacuous():
    # The schema must reject a typo in a node type, or the two tests above prove nothing.
    cfg = _load(LAUNCHER_YAMLS["aws"])
    cfg["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


def test_head_runs_no_work(launcher):
    provider, cfg = launcher
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU: 0 so no task/actor lands on it"
    assert head["resources"].get("GPU", 0) == 0
    instance = _instance_type(provider, head["node_config"])
    assert not re.match(r"^(p\d|g\d|a\d-|a2-|a3-|g2-)", instance), f"head on a GPU instance: {instance}"


def test_gpu_groups_autoscale_from_zero_with_a_spot_variant(launcher):
    provider, cfg = launcher
    gpu_groups = {
        name: node for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and node["resources"].get("GPU", 0) > 0
    }
    assert gpu_groups, "no GPU worker group"
    for name, node in gpu_groups.items():
        assert node.get("min_workers", 0) == 0, f"{name}: GPU nodes must scale from zero"
        assert node.get("max_workers", 0) >= 1, f"{name}: GPU group can never start a node"
        assert node["resources"]["GPU"] == 8, f"{name}: expected 8-GPU nodes"
        assert _instance_type(provider, node["node_config"]) == GPU_INSTANCE[provider]
    assert any(_is_spot(provider, n["node_config"]) for n in gpu_groups.values()), "no spot GPU group"
    assert any(not _is_spot(provider, n["node_config"]) for n in gpu_groups.values()), "no on-demand GPU group"


def test_cpu_group_for_preprocessing_and_idle_timeout(launcher):
    _, cfg = launcher
    cpu_groups = [
        node for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and node["resources"].get("GPU", 0) == 0
        and node["resources"].get("CPU", 0) > 0
    ]
    assert cpu_groups, "no CPU worker group for Ray Data preprocessing"
    assert all(node.get("min_workers", 0) == 0 for node in cpu_groups)
    assert 0 < cfg["idle_timeout_minutes"] <= 60
    group_max = sum(n.get("max_workers", 0) for n in cfg["available_node_types"].values())
    assert cfg["max_workers"] <= group_max, "global max_workers larger than every group can reach"


def test_dashboard_bound_to_localhost_and_token_auth_on(launcher):
    _, cfg = launcher
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start), head_start
    everything = yaml.safe_dump(cfg)
    assert "0.0.0.0" not in everything, "something is bound to all interfaces"
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token", (
        "the token must come from the submitter's ~/.ray/auth_token, not from this file"
    )


def test_image_is_built_from_our_dockerfile(launcher):
    _, cfg = launcher
    docker = cfg["docker"]
    assert docker.get("pull_before_run") is False, "a locally built image cannot be pulled"
    repo_mounts = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(repo_mounts) == 1, "the repository must be mounted exactly once"
    # Ray rsyncs file mounts to this host path before running initialization_commands (outside docker).
    host_repo = f"/tmp/ray_tmp_mount/{cfg['cluster_name']}/{repo_mounts[0].lstrip('/')}"
    builds = [shlex.split(cmd) for cmd in cfg["initialization_commands"] if "docker build" in cmd]
    assert len(builds) == 1, cfg["initialization_commands"]
    argv = builds[0]
    assert argv[argv.index("-f") + 1] == f"{host_repo}/cluster/Dockerfile"
    assert argv[argv.index("-t") + 1] == docker["image"]
    assert argv[-1] == host_repo, "the build context must be the repository root"


def test_file_mounts_are_relative_to_the_repo_or_home(launcher):
    # No absolute laptop paths: the YAML has to work from any clone.
    _, cfg = launcher
    for remote, local in cfg["file_mounts"].items():
        assert remote.startswith("/home/ray/"), remote
        assert local == "." or local.startswith("~/"), local
    assert ".gitignore" in cfg["rsync_filter"], "the .venv and outputs must stay off the wire"


# --------------------------------------------------------------------------------------------- Dockerfile
def _dockerfile_base() -> str:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert match and re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M), "FROM must use the RAY_IMAGE arg"
    return match.group(1)


def test_dockerfile_base_is_a_current_ray_gpu_image_matching_the_pinned_ray():
    base = _dockerfile_base()
    assert "ray-ml" not in base, "rayproject/ray-ml images are discontinued (last: 2.50)"
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"unexpected base image tag {base!r}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    assert match.group(1) == pinned == ray.__version__, (match.group(1), pinned, ray.__version__)
    assert f"ray.__version__ == '{pinned}'" in DOCKERFILE.read_text(), "the image must assert its Ray version"


def test_dockerfile_copies_only_paths_that_exist_and_installs_the_stack():
    text = DOCKERFILE.read_text()
    copied = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            copied.extend(parts[:-1])
    assert copied, "nothing copied into the image"
    for rel in copied:
        assert (ROOT / rel).exists(), f"Dockerfile copies {rel}, which the repository lacks"
    assert "torch" in text and "pyproject.toml" in text
    # (tomllib is 3.11+, the project supports 3.10: read the dependency block as text.)
    deps = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert re.search(r'^\s*"deepspeed', deps, re.M), "DeepSpeed reaches the image through pyproject's deps"
    assert re.search(r"^ARG INSTALL_FLASH_ATTN=0$", text, re.M), "flash-attn must stay optional (off)"
    assert "pip install --no-deps /home/ray/otterhd-ray" in text, "the package itself is not installed"


# ------------------------------------------------------------------------------------------- KubeRay
@pytest.fixture(params=sorted(RAYJOBS))
def rayjob(request) -> tuple[dict[str, Any], str, str]:
    path, script, config = RAYJOBS[request.param]
    return _load(path), script, config


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def test_rayjob_structure(rayjob):
    doc, _, _ = rayjob
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "a finished job must give its GPUs back"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must schedule no work"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard exposed outside the cluster"
    assert head["rayStartParams"].get("dashboard-host") != "0.0.0.0"
    for container in _containers(head["template"]):
        limits = container.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits, "GPU on the head"

    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g["template"]))
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, "GPU group must scale from zero"
        assert group["maxReplicas"] >= 1
        for container in _containers(group["template"]):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_rayjob_image_is_ours_and_consistent(rayjob):
    doc, _, _ = rayjob
    cluster = doc["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in _containers(t)}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    assert next(iter(images)).split("/")[-1].startswith("otterhd-ray:"), images


def test_rayjob_entrypoint_and_config_exist(rayjob):
    doc, script, config = rayjob
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", script, "--config", config], argv
    assert (ROOT / script).is_file(), f"entrypoint {script} missing from the repository"
    assert (ROOT / config).is_file(), f"config {config} missing from the repository"
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    # The submitter uploads this directory of the image: it must be where the Dockerfile puts the repo.
    assert runtime_env["working_dir"] == "/home/ray/otterhd-ray"
    assert re.search(r"^WORKDIR /home/ray/otterhd-ray$", DOCKERFILE.read_text(), re.M)


def test_rayjob_secrets_only_by_reference(rayjob):
    doc, _, _ = rayjob
    cluster = doc["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in _containers(template):
            for env in container.get("env", []):
                if _SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert not any(_SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {})), "secret in runtime_env"


# ----------------------------------------------------------------------------------------------- secrets
# `token` only as a whole word part, so TOKENIZERS_PARALLELISM is not a secret but RAY_AUTH_TOKEN is.
_SECRET_NAME = re.compile(
    r"(api[_-]?key|access[_-]?key|secret|password|passwd|credential|(^|[_-])token($|[_-]))", re.I
)
# Shapes of real credentials. Fake keys in tests/ are generated at run time or are obviously fake, and the
# test directory is excluded below because it must hold such fakes to prove they never leak.
_SECRET_SHAPES = {
    "OpenAI key": re.compile(r"\bsk-(proj-)?[A-Za-z0-9_-]{20,}"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "HF token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
        files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    # Ours are checked even before their first commit.
    files += [ROOT / "cluster" / n for n in ("aws.yaml", "gcp.yaml", "Dockerfile")]
    files += [RAYJOBS[k][0] for k in RAYJOBS] + [ROOT / "docs" / "operations.md"]
    files += [ROOT / "cluster" / "grafana" / "otterhd_dashboard.json"]
    return sorted({f for f in files if f.is_file() and "tests" not in f.relative_to(ROOT).parts[:1]})


def test_no_secret_in_any_committed_file():
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for what, pattern in _SECRET_SHAPES.items():
            for match in pattern.finditer(text):
                hits.append(f"{path.relative_to(ROOT)}: {what} ({match.group(0)[:8]}...)")
    assert not hits, "credential-shaped strings in committed files:\n" + "\n".join(hits)


def _literal_secret_values(node: Any, trail: str = "") -> list[str]:
    """Mapping keys named like a secret whose value is a literal string (references are fine)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{trail}.{key}"
            if isinstance(key, str) and _SECRET_NAME.search(key) and isinstance(value, str):
                # `api_key_env: OTTERHD_API_KEY` names the variable that holds the key: a reference, not a value.
                names_a_variable = key.endswith("_env") and re.fullmatch(r"[A-Z_][A-Z0-9_]*", value)
                if value.strip() and not value.startswith("${") and value != "~/.ray/auth_token" \
                        and not names_a_variable:
                    found.append(where)
            found += _literal_secret_values(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _literal_secret_values(item, f"{trail}[{i}]")
    return found


def test_no_literal_secret_values_in_shipped_yaml():
    yamls = [*LAUNCHER_YAMLS.values(), *(v[0] for v in RAYJOBS.values())]
    yamls += sorted((ROOT / "configs").rglob("*.yaml"))
    hits = []
    for path in yamls:
        for doc in yaml.safe_load_all(path.read_text()):
            hits += [f"{path.relative_to(ROOT)}: {w}" for w in _literal_secret_values(doc)]
    assert not hits, "secret-named keys with literal values:\n" + "\n".join(hits)


def test_secret_scanners_catch_what_they_claim():
    fake = "sk-" + "A1b2" * 6
    assert _SECRET_SHAPES["OpenAI key"].search(f"api_key: {fake}")
    assert _SECRET_SHAPES["AWS access key id"].search("AKIA" + "ABCDEFGHIJKLMNOP")
    assert _literal_secret_values({"judge": {"api_key": fake}}) == [".judge.api_key"]
    assert _literal_secret_values({"api_key": None, "datasets": [{"api_key": ["You GPT-4 API"]}]}) == []
    assert _literal_secret_values({"args": {"api_key_env": "OTTERHD_API_KEY"}}) == []
    assert _literal_secret_values({"args": {"api_key_env": fake}}) == [".args.api_key_env"]
    assert _SECRET_NAME.search("RAY_AUTH_TOKEN") and _SECRET_NAME.search("WANDB_API_KEY")
    assert not _SECRET_NAME.search("TOKENIZERS_PARALLELISM")
