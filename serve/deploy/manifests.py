"""What the manifests take from a model file or the gateway settings: names, GPU counts, deadlines, patches."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from serve.config.gateway import GatewayFile
from serve.config.loader import ConfigError
from serve.config.model_file import ModelFile
from serve.deploy import layout
from serve.deploy.spec import Autoscale

GPU_RESOURCE = "nvidia.com/gpu"

# preStop pauses: a terminating pod keeps serving while its removal from Service endpoints reaches kube-proxy, the
# ingress controller and DNS (the gateway, in turn, re-checks engines every health_interval seconds).
GATEWAY_PRESTOP_SECONDS = 5
ENGINE_PRESTOP_SECONDS = 10
# After the drain deadline the process still has to exit (close connections, free the GPUs).
EXIT_MARGIN_SECONDS = 10
STARTUP_PERIOD_SECONDS = 10

Runtime = Literal["deployment", "ray"]
Json = dict[str, Any]


def slug(name: str) -> str:
    """A model name as a DNS label fragment: lowercase letters, digits and dashes."""
    value = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not value or len(value) > 40:
        raise ConfigError(f"model name {name!r} does not give a usable Kubernetes name (1-40 characters)")
    return value


def engine_name(model: ModelFile) -> str:
    return f"llmserve-engine-{slug(model.name)}"


def runtime(model: ModelFile) -> Runtime:
    """Ray's executor means a KubeRay cluster; anything else fits one pod."""
    return "ray" if model.engine.distributed_executor_backend == "ray" else "deployment"


def engine_image(registry: str, model: ModelFile, version: str) -> str:
    flavour = "gpu" if model.engine.device == "cuda" else "cpu"
    return f"{registry}/engine-{flavour}:{version}"


def gateway_image(registry: str, version: str) -> str:
    return f"{registry}/gateway:{version}"


def prestop(seconds: int) -> Json:
    return {"preStop": {"exec": {"command": ["sleep", str(seconds)]}}}


def engine_grace_seconds(model: ModelFile) -> int:
    """preStop pause + vLLM's --shutdown-timeout (requests in flight finish) + time to exit."""
    return ENGINE_PRESTOP_SECONDS + model.engine.shutdown_timeout + EXIT_MARGIN_SECONDS


def gateway_grace_seconds(gateway: GatewayFile) -> int:
    """preStop pause + the gateway's drain_timeout + time to exit."""
    return GATEWAY_PRESTOP_SECONDS + math.ceil(gateway.drain_timeout) + EXIT_MARGIN_SECONDS


def startup_failure_threshold(model: ModelFile) -> int:
    return math.ceil(model.engine.startup_timeout / STARTUP_PERIOD_SECONDS)


def discovery(model: ModelFile) -> Json:
    """How the gateway finds this model's engine pods: its headless Service, re-resolved at every health check,
    so each pod is an endpoint of its own (least-outstanding choice, health checks, ejection)."""
    if model.endpoints or model.discovery is not None:
        raise ConfigError(f"{model.name}: in Kubernetes the render step says where the engines are, not the file")
    return {"discovery": {"name": engine_name(model), "port": layout.PORT}}


def gateway_settings(gateway: GatewayFile, models: list[ModelFile]) -> Json:
    """configs/gateway.yaml as the gateway pods read it: listening on all interfaces, the model files mounted."""
    data = gateway.model_dump(mode="json", exclude_unset=True)
    data.update(
        host=layout.LISTEN_HOST,
        port=layout.PORT,
        keys_file=str(layout.KEYS_FILE),
        models=[{"file": str(layout.GATEWAY_MODELS_DIR / f"{slug(m.name)}.yaml")} for m in models],
    )
    GatewayFile.model_validate(data)
    return data


def gateway_patch(gateway: GatewayFile, image: str) -> Json:
    container = {
        "name": "gateway",
        "image": image,
        "args": layout.gateway_args(),
        "ports": [layout.port()],
        "env": [{"name": "HOME", "value": str(layout.GATEWAY_HOME)}],
        "volumeMounts": layout.mounts(layout.GATEWAY_MOUNTS),
        "lifecycle": prestop(GATEWAY_PRESTOP_SECONDS),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llmserve-gateway"},
        "spec": {
            "template": {
                "spec": {"terminationGracePeriodSeconds": gateway_grace_seconds(gateway), "containers": [container]}
            }
        },
    }


def engine_service_patch() -> Json:
    """The engine's headless Service (either runtime): the port the gateway's discovery connects to."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "llmserve-engine"},
        "spec": {"ports": [{"name": layout.PORT_NAME, "port": layout.PORT, "targetPort": layout.PORT_NAME}]},
    }


def gpu_resources(count: int) -> Json:
    return {"requests": {GPU_RESOURCE: str(count)}, "limits": {GPU_RESOURCE: str(count)}}


def deployment_patch(model: ModelFile, image: str) -> Json:
    """The engine Deployment's model-dependent fields (strategic merge patch on deploy/k8s/engine)."""
    engine: Json = {
        "name": "engine",
        "image": image,
        "args": layout.engine_args(),
        "ports": [layout.port()],
        "volumeMounts": layout.mounts(layout.ENGINE_MOUNTS),
        "lifecycle": prestop(ENGINE_PRESTOP_SECONDS),
        "startupProbe": {
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "failureThreshold": startup_failure_threshold(model),
        },
    }
    if model.engine.device == "cuda":
        engine["resources"] = gpu_resources(model.engine.world_size)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llmserve-engine"},
        "spec": {
            "replicas": model.engine.replicas,
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": engine_grace_seconds(model),
                    "initContainers": [
                        {
                            "name": "prepare",
                            "image": image,
                            "args": layout.prepare_args(),
                            "volumeMounts": layout.mounts(layout.PREPARE_MOUNTS),
                        }
                    ],
                    "containers": [engine],
                }
            },
        },
    }


def ray_patch(model: ModelFile, image: str) -> list[Json]:
    """The RayCluster's model-dependent fields (JSON patch on deploy/k8s/ray): one GPU worker per pipeline stage,
    tensor_parallel_size GPUs in each; the head runs the engine without a GPU."""
    e = model.engine
    if e.device != "cuda":
        raise ConfigError(f"{model.name}: vLLM's Ray executor runs on GPUs only (engine.device is {e.device})")
    head = "/spec/headGroupSpec/template/spec"
    worker = "/spec/workerGroupSpecs/0"
    gpus = f"{worker}/template/spec/containers/0/resources"
    grace = engine_grace_seconds(model)
    ops: list[tuple[str, str, object]] = [
        ("replace", f"{head}/containers/0/image", image),
        ("add", f"{head}/containers/0/args", layout.engine_args()),
        ("add", f"{head}/containers/0/ports/0", layout.port()),
        ("add", f"{head}/containers/0/volumeMounts", layout.mounts(layout.ENGINE_MOUNTS)),
        ("replace", f"{head}/initContainers/0/image", image),
        ("add", f"{head}/initContainers/0/args", layout.prepare_args()),
        ("add", f"{head}/initContainers/0/volumeMounts", layout.mounts(layout.PREPARE_MOUNTS)),
        ("add", f"{head}/containers/0/lifecycle", prestop(ENGINE_PRESTOP_SECONDS)),
        ("replace", f"{head}/containers/0/startupProbe/periodSeconds", STARTUP_PERIOD_SECONDS),
        ("replace", f"{head}/containers/0/startupProbe/failureThreshold", startup_failure_threshold(model)),
        ("add", f"{head}/terminationGracePeriodSeconds", grace),
        ("replace", f"{worker}/replicas", e.pipeline_parallel_size),
        ("replace", f"{worker}/minReplicas", e.pipeline_parallel_size),
        ("replace", f"{worker}/maxReplicas", e.pipeline_parallel_size),
        ("replace", f"{worker}/template/spec/containers/0/image", image),
        ("add", f"{worker}/template/spec/containers/0/volumeMounts", layout.mounts(layout.RAY_WORKER_MOUNTS)),
        ("replace", f"{gpus}/requests/nvidia.com~1gpu", str(e.tensor_parallel_size)),
        ("replace", f"{gpus}/limits/nvidia.com~1gpu", str(e.tensor_parallel_size)),
        ("add", f"{worker}/template/spec/terminationGracePeriodSeconds", grace),
    ]
    return [{"op": op, "path": path, "value": value} for op, path, value in ops]


def scaled_object(model: ModelFile, namespace: str, autoscale: Autoscale) -> Json:
    """KEDA scales the engine Deployment on the queue of this model's engines."""
    if autoscale.max_replicas < model.engine.replicas:
        raise ConfigError(f"{model.name}: autoscale.max_replicas is below engine.replicas ({model.engine.replicas})")
    query = f'sum(vllm:num_requests_waiting{{namespace="{namespace}",model_name="{model.name}"}})'
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        # The kustomization's nameSuffix turns this into the engine's name.
        "metadata": {"name": "llmserve-engine"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": engine_name(model)},
            "minReplicaCount": model.engine.replicas,
            "maxReplicaCount": autoscale.max_replicas,
            "pollingInterval": 15,
            # An engine takes minutes to load: scale up one at a time, keep replicas a while before removing one.
            "cooldownPeriod": 600,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleUp": {
                            "stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                        },
                        "scaleDown": {
                            "stabilizationWindowSeconds": 600,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                        },
                    }
                }
            },
            # Prometheus unreachable: hold the minimum rather than scaling on no data.
            "fallback": {"failureThreshold": 3, "replicas": model.engine.replicas},
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": autoscale.prometheus,
                        "query": query,
                        "threshold": str(autoscale.waiting_per_replica),
                        "ignoreNullValues": "true",
                    },
                }
            ],
        },
    }
