"""configs/serve/*.yaml and cluster/kuberay/rayservice.yaml: valid for Serve, KubeRay-shaped, consistent."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "configs" / "serve" / "otterhd_8b.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"

serve_schema = pytest.importorskip("ray.serve.schema")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def test_serve_config_is_valid_for_serve_and_its_args_for_us():
    from otterhd_ray.serve.options import load_options

    cfg = _load(SERVE_CONFIG)
    serve_schema.ServeDeploySchema.model_validate(cfg)  # what `serve deploy` checks
    (app,) = cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    from otterhd_ray.serve.deployment import OtterHDDeployment, build_app

    assert builder is build_app
    opts = load_options(app["args"], str(SERVE_CONFIG))
    assert opts.api_key_env and "api_key" not in app["args"]
    (dep,) = app["deployments"]
    assert dep["name"] == OtterHDDeployment.name
    assert dep["ray_actor_options"]["num_gpus"] == 1
    assert dep["max_ongoing_requests"] >= opts.max_batch_size + opts.max_queue


def test_serve_builder_refuses_unknown_args_by_name():
    from otterhd_ray.serve.deployment import build_app

    with pytest.raises(ValueError, match="max_batchsize"):
        build_app({"model": "/m", "max_batchsize": 4})


def test_rayservice_runs_the_same_applications_with_the_key_from_a_secret():
    import ray

    doc = _load(RAYSERVICE)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_v2 = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve_schema.ServeDeploySchema.model_validate(serve_v2)
    assert serve_v2["applications"] == _load(SERVE_CONFIG)["applications"]
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    key_env = serve_v2["applications"][0]["args"]["api_key_env"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu")]
    assert gpu["minReplicas"] == 0
    (container,) = gpu["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env[key_env] and "secretKeyRef" in env[key_env]["valueFrom"]
    images = {c["image"] for t in [cluster["headGroupSpec"]["template"], gpu["template"]]
              for c in t["spec"]["containers"]}
    assert len(images) == 1 and next(iter(images)).startswith("otterhd-ray:")
