"""The committed generated/ files are what the render step makes from the model files now (drift check), and what
the render step derives follows the model files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from serve.cli import parser
from serve.config.loader import ConfigError
from serve.deploy.render import current_files, overlays, render_overlay, run
from tests.k8s.rendering import GPU, K8S, OVERLAYS, ROOT, kustomize, of_kind, pod_templates


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generated_files_are_up_to_date(overlay: str) -> None:
    path = K8S / "overlays" / overlay
    fresh = render_overlay(ROOT, path)
    committed = current_files(path)
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"{path}/generated is out of date ({', '.join(stale)}): run `llmserve k8s render`"


def test_every_overlay_is_rendered() -> None:
    assert [p.name for p in overlays(ROOT)] == sorted(OVERLAYS)
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted(OVERLAYS)


def test_render_check_command() -> None:
    args = parser().parse_args(["k8s", "render", "--check", "--root", str(ROOT)])
    assert args.func(args) == 0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of what the render step and kustomize read, to change model files in."""
    for part in ("configs", "deploy/k8s"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def edit_yaml(path: Path, change: dict[str, object]) -> None:
    data = yaml.safe_load(path.read_text())
    data["engine"].update(change)
    path.write_text(yaml.safe_dump(data))


def test_a_model_file_change_flows_into_the_manifests(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_yaml(repo / "configs/models/llama-2-13b-chat.yaml", {"tensor_parallel_size": 4, "shutdown_timeout": 300})
    assert run(repo, check=True) == 1
    assert "gpu-llama-2-13b/generated is out of date" in capsys.readouterr().err
    assert run(repo, check=False) == 0
    assert run(repo, check=True) == 0
    (engine,) = [t for t in pod_templates(kustomize(repo / "deploy/k8s/overlays/gpu-llama-2-13b")) if t.model]
    assert engine.containers[0]["resources"]["limits"][GPU] == "4"
    assert engine.spec["terminationGracePeriodSeconds"] > 300


def test_ray_workers_follow_pipeline_parallel(repo: Path) -> None:
    edit_yaml(repo / "configs/models/llama-2-70b-chat-multinode.yaml", {"pipeline_parallel_size": 3})
    assert run(repo, check=False) == 0
    (cluster,) = of_kind(kustomize(repo / "deploy/k8s/overlays/ray-multinode"), "RayCluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 3


def test_render_removes_files_of_models_no_longer_served(repo: Path) -> None:
    overlay = repo / "deploy/k8s/overlays/cpu-dev"
    stale = overlay / "generated/engine-old/model.yaml"
    stale.parent.mkdir()
    stale.write_text("name: old\n")
    assert run(repo, check=True) == 1
    run(repo, check=False)
    assert not stale.parent.exists()


def test_ray_models_cannot_autoscale_or_run_on_cpu(repo: Path) -> None:
    spec = repo / "deploy/k8s/overlays/ray-multinode/llmserve.yaml"
    data = yaml.safe_load(spec.read_text())
    data["models"][0]["autoscale"] = {"prometheus": "http://p:9090", "max_replicas": 2, "waiting_per_replica": 4}
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no autoscale"):
        render_overlay(repo, spec.parent)
    del data["models"][0]["autoscale"]
    spec.write_text(yaml.safe_dump(data))
    edit_yaml(repo / "configs/models/llama-2-70b-chat-multinode.yaml", {"device": "cpu"})
    with pytest.raises(ConfigError, match="GPUs only"):
        render_overlay(repo, spec.parent)
