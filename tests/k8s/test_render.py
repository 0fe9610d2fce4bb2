"""The committed generated/ files are what the render step makes from the model files now (drift check), and what
the render step derives follows the model files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from serve.cli import parser
from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile, load_model_file
from serve.deploy import layout
from serve.deploy.images import MARKER
from serve.deploy.render import current_files, overlays, render_overlay, run
from tests.k8s.rendering import GPU, K8S, OVERLAYS, ROOT, kustomize, mount_source, of_kind, pod_templates


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
    for part in ("configs", "deploy"):
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


def test_a_model_file_that_extends_another_is_mounted_merged(repo: Path) -> None:
    """The pods see one file: the render step writes the merged model file, not the few lines that extend."""
    (repo / "configs/models/small.yaml").write_text(
        "extends: smollm2-135m-cpu.yaml\nname: smollm2-small\naliases: []\nengine: {max_num_seqs: 4}\n"
    )
    spec = repo / "deploy/k8s/overlays/cpu-dev/llmserve.yaml"
    spec.write_text(spec.read_text().replace("smollm2-135m-cpu.yaml", "small.yaml"))
    assert run(repo, check=False) == 0
    expected = load_model_file(repo / "configs/models/small.yaml")
    objs = kustomize(repo / "deploy/k8s/overlays/cpu-dev")
    (engine,) = [t for t in pod_templates(objs) if t.component == "engine"]
    container = engine.containers[0]
    config_map, key = mount_source(objs, engine, container, container["args"][1])
    mounted = yaml.safe_load(config_map["data"][key])
    assert "extends" not in mounted
    assert ModelFile.model_validate(mounted) == expected
    # Its own field, and one it inherits from the file it extends.
    base = load_model_file(repo / "configs/models/smollm2-135m-cpu.yaml")
    assert expected.engine.max_num_seqs == 4 != base.engine.max_num_seqs
    assert "dtype" not in (repo / "configs/models/small.yaml").read_text()
    assert expected.engine.dtype == base.engine.dtype
    (models,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("llmserve-models-")]
    gateway_copy = yaml.safe_load(models["data"]["smollm2-small.yaml"])
    assert ModelFile.model_validate(gateway_copy).model_copy(update={"discovery": None}) == expected


def test_dockerfile_tails_are_rendered_and_checked(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dockerfile = repo / "deploy/images/gateway.Dockerfile"
    committed = dockerfile.read_text()
    dockerfile.write_text(committed.replace("EXPOSE 8000", "EXPOSE 9000"))
    assert run(repo, check=True) == 1
    assert "deploy/images/gateway.Dockerfile is out of date" in capsys.readouterr().err
    assert run(repo, check=False) == 0
    assert dockerfile.read_text() == committed


# Each value of the container layout, as a hand-written file would spell it.
LAYOUT_VALUES = [
    str(layout.PORT),
    *(str(path) for path in (layout.CONFIG, layout.WEIGHTS, layout.CACHE, layout.TMP, layout.SHM)),
]


def hand_written(path: Path) -> str:
    """A template or Dockerfile without comments and without what the render step writes."""
    text = path.read_text().split(MARKER, 1)[0]
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_port_and_container_paths_are_written_in_one_place() -> None:
    """serve/deploy/layout.py holds the port and where files live in the containers; no template repeats them."""
    sources = [p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix in {".yaml", ".Dockerfile"}]
    sources = [p for p in sources if "generated" not in p.parts]
    assert len(sources) > 20
    found = []
    for path in sources:
        text = hand_written(path)
        found += [
            f"{path.relative_to(ROOT)}: {value}"
            for value in LAYOUT_VALUES
            if re.search(rf"(?<![\w/]){re.escape(value)}(?![\w])", text)
        ]
    assert not found, "\n".join(found)
