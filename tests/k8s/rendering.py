"""The overlays rendered with `kubectl kustomize`, and ways to walk the objects they contain."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve.config.model_file import ModelFile, load_model_file
from serve.deploy.manifests import slug
from serve.deploy.spec import SPEC_FILE, load_overlay_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu-llama-2-13b", "ray-multinode")
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


def kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays (`kubectl kustomize`); install it (v1.27+)"
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[Obj]:
    """The overlay's objects (a fresh copy: tests may not change each other's view)."""
    return copy.deepcopy(list(_rendered(overlay)))


def source_models(overlay: str) -> dict[str, tuple[Path, ModelFile]]:
    """The model files an overlay is made from (its llmserve.yaml), by Kubernetes name."""
    spec = load_overlay_spec(K8S / "overlays" / overlay / SPEC_FILE)
    models = {}
    for entry in spec.models:
        model = load_model_file(ROOT / entry.file)
        models[slug(model.name)] = (ROOT / entry.file, model)
    return models


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@dataclass
class PodTemplate:
    """A pod template in a workload, and how many pods of it run."""

    owner: str
    namespace: str
    labels: dict[str, str]
    spec: Obj
    replicas: int

    @property
    def containers(self) -> list[Obj]:
        return list(self.spec["containers"])

    @property
    def all_containers(self) -> list[Obj]:
        return list(self.spec.get("initContainers", [])) + self.containers

    @property
    def component(self) -> str:
        return self.labels.get("app.kubernetes.io/component", "")

    @property
    def model(self) -> str | None:
        return self.labels.get("llmserve.io/model")


def pod_templates(objs: list[Obj]) -> list[PodTemplate]:
    templates = []
    for o in objs:
        ns = o["metadata"].get("namespace", "")
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            t = o["spec"]["template"]
            replicas = o["spec"].get("replicas", 1)
            templates.append(PodTemplate(name, ns, t["metadata"].get("labels", {}), t["spec"], replicas))
        elif o["kind"] == "RayCluster":
            head = o["spec"]["headGroupSpec"]["template"]
            templates.append(PodTemplate(f"{name} head", ns, head["metadata"].get("labels", {}), head["spec"], 1))
            for group in o["spec"].get("workerGroupSpecs", []):
                t = group["template"]
                labels = t["metadata"].get("labels", {})
                templates.append(
                    PodTemplate(f"{name} {group['groupName']}", ns, labels, t["spec"], group.get("replicas", 1))
                )
    return templates


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """matchLabels semantics (the only form the overlays use); an empty selector selects everything."""
    selector = selector or {}
    assert not selector.get("matchExpressions"), "matchExpressions are not used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def mount_source(objs: list[Obj], template: PodTemplate, container: Obj, path: str) -> tuple[Obj, str]:
    """The ConfigMap (and key) a file path inside a container comes from."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in template.spec["volumes"] if v["name"] == mount["name"])
            assert "configMap" in volume, f"{path} is not on a ConfigMap volume in {template.owner}"
            cm = named(objs, "ConfigMap", volume["configMap"]["name"])
            key = path[len(prefix) :]
            assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
            return cm, key
    raise AssertionError(f"{path} is on no volume of {template.owner}")


def env_of(objs: list[Obj], container: Obj) -> dict[str, str]:
    """Literal environment of a container: envFrom ConfigMaps, then env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def launcher_argv(container: Obj) -> list[str]:
    """The `llmserve ...` command line a container runs, whether direct or at the end of a shell script that
    execs the launcher with the container's arguments (`bash -c SCRIPT NAME ARGS...`)."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    if argv[:1] == ["llmserve"]:
        return argv
    assert argv[:2] == ["/bin/bash", "-c"], f"{container['name']}: unexpected command {argv}"
    lines = [line.strip() for line in argv[2].splitlines() if line.strip().startswith("exec llmserve")]
    assert lines == ['exec llmserve "$@"'], f"{container['name']}: the script must exec the launcher once, on its args"
    return ["llmserve", *argv[4:]]
