"""Every rendered object validates: built-in kinds with kubernetes-validate (strict), custom resources against
the schemas in tests/k8s/crds."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from tests.k8s.rendering import Obj

CRDS = Path(__file__).parent / "crds"
# The oldest Kubernetes the manifests support, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kv.latest_version())
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitor.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule.yaml",
    ("ray.io/v1", "RayCluster"): "ray.io_raycluster.yaml",
}


@functools.cache
def registry(version: str) -> Registry[Any]:
    """Our custom resource schemas, plus Kubernetes' definitions (pod templates, metadata) they refer to."""
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    resources = [Resource.from_contents(definitions)]
    resources += [Resource.from_contents(yaml.safe_load(path.read_text())) for path in sorted(CRDS.glob("*.yaml"))]
    return resources @ Registry()


def validate_custom(obj: Obj, version: str) -> None:
    schema = yaml.safe_load((CRDS / CUSTOM[(obj["apiVersion"], obj["kind"])]).read_text())
    jsonschema.Draft202012Validator(schema, registry=registry(version)).validate(obj)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(objs: list[Obj], version: str) -> None:
    failures = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            if (obj["apiVersion"], obj["kind"]) in CUSTOM:
                validate_custom(obj, version)
            else:
                kv.validate(obj, version, strict=True)
        except kv.SchemaNotFoundError:
            failures.append(f"{name}: no schema for {obj['apiVersion']} (add one to tests/k8s/crds)")
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            failures.append(f"{name}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_custom_schemas_reject_unknown_and_mistyped_fields() -> None:
    """The custom schemas are strict: a misspelt field or a wrong type fails, as it would on the API server."""
    version = K8S_VERSIONS[0]
    good: Obj = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "prometheus", "metadata": {"query": "1"}}]},
    }
    validate_custom(good, version)
    misspelt = {**good, "spec": {**good["spec"], "maxReplicas": 3}}
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(misspelt, version)
    ray: Obj = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "x"},
        "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "a", "imagePullPolicy": 3}]}}}},
    }
    with pytest.raises(jsonschema.ValidationError, match="3"):
        validate_custom(ray, version)
