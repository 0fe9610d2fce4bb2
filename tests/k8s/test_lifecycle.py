"""Probes, drain deadlines, GPUs and disruption budgets of the rendered workloads, checked against the model files
and gateway settings they come from."""

from __future__ import annotations

import math

import yaml

from serve.config.gateway import GatewayFile
from serve.config.model_file import ModelFile
from tests.k8s.rendering import (
    GPU,
    Obj,
    PodTemplate,
    mount_source,
    named,
    of_kind,
    pod_templates,
    selects,
    source_models,
)


def main_container(t: PodTemplate) -> Obj:
    return t.containers[0]


def port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return int(numbers[0])


def probe_port(container: Obj, probe: Obj) -> int:
    action = probe.get("httpGet") or probe.get("tcpSocket")
    assert action, f"{container['name']}: probe without httpGet/tcpSocket: {probe}"
    return port_number(container, action["port"])


def prestop_seconds(container: Obj) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"], f"{container['name']}: no preStop pause"
    return int(command[1])


def engine_templates(objs: list[Obj]) -> list[PodTemplate]:
    return [t for t in pod_templates(objs) if t.component == "engine"]


def model_of(overlay: str, t: PodTemplate) -> ModelFile:
    assert t.model, f"{t.owner} has no llmserve.io/model label"
    return source_models(overlay)[t.model][1]


def gateway_file(objs: list[Obj]) -> GatewayFile:
    (gateway,) = [t for t in pod_templates(objs) if t.component == "gateway"]
    container = main_container(gateway)
    config = container["args"][container["args"].index("--config") + 1]
    cm, key = mount_source(objs, gateway, container, config)
    return GatewayFile.model_validate(yaml.safe_load(cm["data"][key]))


def test_every_serving_container_has_probes(objs: list[Obj]) -> None:
    for t in pod_templates(objs):
        c = main_container(t)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert kind in c, f"{t.owner}: no {kind}"
            port = probe_port(c, c[kind])
            assert port in {p["containerPort"] for p in c.get("ports", [])}, f"{t.owner}: {kind} on an undeclared port"


def test_gateway_is_ready_only_with_engines_and_alive_without_them(objs: list[Obj]) -> None:
    (t,) = [t for t in pod_templates(objs) if t.component == "gateway"]
    c = main_container(t)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_engine_probes(overlay: str, objs: list[Obj]) -> None:
    templates = engine_templates(objs)
    assert templates
    for t in templates:
        c = main_container(t)
        model = model_of(overlay, t)
        assert c["readinessProbe"]["httpGet"]["path"] == "/health", t.owner
        # A busy engine answers /health late; a TCP check cannot fail because of load.
        assert "tcpSocket" in c["livenessProbe"], f"{t.owner}: liveness must not depend on the engine's load"
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/health", t.owner
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= model.engine.startup_timeout, f"{t.owner}: startup probe gives up after {budget}s"


def test_grace_period_covers_prestop_and_drain(overlay: str, objs: list[Obj]) -> None:
    gateway = gateway_file(objs)
    templates = [t for t in pod_templates(objs) if t.component in {"gateway", "engine"}]
    assert {t.component for t in templates} == {"gateway", "engine"}
    for t in templates:
        c = main_container(t)
        if t.component == "gateway":
            deadline = math.ceil(gateway.drain_timeout)
        else:
            deadline = model_of(overlay, t).engine.shutdown_timeout
        needed = prestop_seconds(c) + deadline
        grace = t.spec.get("terminationGracePeriodSeconds", 30)
        assert grace > needed, f"{t.owner}: grace {grace}s <= preStop + drain {needed}s"


def test_gpu_count_is_tp_times_pp(overlay: str, objs: list[Obj]) -> None:
    """Per engine replica (a pod, or a whole Ray cluster): the model file's world size, never typed by hand."""
    gpus: dict[str, int] = {}
    for t in pod_templates(objs):
        for c in t.all_containers:
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            assert limits.get(GPU) == requests.get(GPU), f"{t.owner}: GPU request and limit differ"
            if GPU in limits:
                assert t.model, f"{t.owner} has GPUs but no model"
                per_replica = t.replicas if t.owner.startswith("RayCluster") else 1
                gpus[t.model] = gpus.get(t.model, 0) + int(limits[GPU]) * per_replica
    for name, (_, model) in source_models(overlay).items():
        expected = model.engine.world_size if model.engine.device == "cuda" else 0
        assert gpus.get(name, 0) == expected, f"{name}: {gpus.get(name, 0)} GPUs, model file says {expected}"


def test_gpu_engines_have_memory_backed_shm(objs: list[Obj]) -> None:
    for t in pod_templates(objs):
        for c in t.containers:
            if GPU not in c.get("resources", {}).get("limits", {}):
                continue
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert mounts, f"{t.owner}: GPU container without /dev/shm"
            volume = next(v for v in t.spec["volumes"] if v["name"] == mounts[0]["name"])
            assert volume.get("emptyDir", {}).get("medium") == "Memory", f"{t.owner}: /dev/shm is not in memory"


def test_engine_replicas_and_ray_workers_follow_the_model_file(overlay: str, objs: list[Obj]) -> None:
    for t in engine_templates(objs):
        model = model_of(overlay, t)
        if t.owner.startswith("RayCluster"):
            cluster = named(objs, "RayCluster", t.owner.split()[0].split("/")[1])
            (workers,) = cluster["spec"]["workerGroupSpecs"]
            pp = model.engine.pipeline_parallel_size
            assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == pp
            assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
        else:
            assert t.replicas == model.engine.replicas, t.owner


def test_every_workload_has_exactly_one_disruption_budget(objs: list[Obj]) -> None:
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for t in pod_templates(objs):
        matching = [p["metadata"]["name"] for p in pdbs if selects(p["spec"]["selector"], t.labels)]
        assert len(matching) == 1, f"{t.owner} is covered by {matching or 'no'} PodDisruptionBudget"
    for p in pdbs:
        assert any(selects(p["spec"]["selector"], t.labels) for t in pod_templates(objs)), p["metadata"]["name"]


def test_network_policies(objs: list[Obj]) -> None:
    policies = of_kind(objs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    for t in pod_templates(objs):
        own = [p for p in policies if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], t.labels)]
        assert own, f"{t.owner} has no NetworkPolicy of its own"
        sources = [peer for p in own for rule in p["spec"].get("ingress", []) for peer in rule.get("from", [])]
        for peer in sources:
            namespace = peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            pods = peer.get("podSelector", {}).get("matchLabels", {})
            if t.component == "gateway":
                assert namespace in {"ingress-nginx", "monitoring"}, f"gateway open to {peer}"
            elif namespace:
                assert namespace == "monitoring" and pods.get("app.kubernetes.io/name") == "prometheus", peer
            else:
                # In the namespace: the gateway, or (Ray) the pods of the same cluster.
                assert pods.get("app.kubernetes.io/component") == "gateway" or "llmserve.io/runtime" in pods, peer
        if t.component.startswith("engine"):
            for rule in (rule for p in own for rule in p["spec"].get("egress", [])):
                assert allowed_engine_egress(rule), f"{t.owner}: egress {rule}"


def allowed_engine_egress(rule: Obj) -> bool:
    """DNS, HTTPS to public addresses (the model download), or the pods of the same Ray cluster."""
    ports = {port["port"] for port in rule.get("ports", [])}
    peers = rule.get("to", [])
    if ports == {53}:
        return True
    if ports == {443}:
        return all({"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(p["ipBlock"]["except"]) for p in peers)
    return bool(peers) and all("llmserve.io/runtime" in p.get("podSelector", {}).get("matchLabels", {}) for p in peers)


def test_gateway_routes_to_engine_services_of_its_models(overlay: str, objs: list[Obj]) -> None:
    gateway = gateway_file(objs)
    (t,) = [t for t in pod_templates(objs) if t.component == "gateway"]
    c = main_container(t)
    assert gateway.host == "0.0.0.0" and gateway.port == port_number(c, "http")
    keys_mount = next(m for m in c["volumeMounts"] if str(gateway.keys_file).startswith(m["mountPath"] + "/"))
    keys_volume = next(v for v in t.spec["volumes"] if v["name"] == keys_mount["name"])
    assert keys_volume["secret"]["secretName"] == "llmserve-gateway-keys"
    served = {}
    for entry in gateway.models:
        assert not entry.endpoints, "engines are discovered through their Service, not listed"
        cm, key = mount_source(objs, t, c, str(entry.file))
        model = ModelFile.model_validate(yaml.safe_load(cm["data"][key]))
        assert model.discovery is not None, f"{model.name}: the gateway cannot find its engines"
        service = named(objs, "Service", model.discovery.name)
        # Headless: the name resolves to every ready engine pod, each its own endpoint in the gateway's pool.
        assert service["spec"]["clusterIP"] == "None"
        assert model.discovery.port in {p["port"] for p in service["spec"]["ports"]}
        selector = {"matchLabels": service["spec"]["selector"]}
        backends = [e for e in engine_templates(objs) if selects(selector, e.labels)]
        assert len(backends) == 1, f"{service['metadata']['name']} selects {[b.owner for b in backends]}"
        assert model_of(overlay, backends[0]).name == model.name
        assert model.discovery.port == port_number(main_container(backends[0]), "http")
        served[model.name] = model.model_copy(update={"discovery": None})
    assert served == {m.name: m for _, m in source_models(overlay).values()}


def test_autoscalers_target_existing_workloads(objs: list[Obj]) -> None:
    deployments = {d["metadata"]["name"] for d in of_kind(objs, "Deployment")}
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objs, "HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in of_kind(objs, "ScaledObject")]
    assert "llmserve-gateway" in targets
    assert set(targets) <= deployments
    assert len(targets) == len(set(targets)), "two autoscalers fight over one Deployment"


def test_engines_scale_on_their_own_queue(overlay: str, objs: list[Obj]) -> None:
    for so in of_kind(objs, "ScaledObject"):
        deployment = named(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        t = next(t for t in pod_templates([deployment]))
        model = model_of(overlay, t)
        (trigger,) = so["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert trigger["type"] == "prometheus"
        assert "vllm:num_requests_waiting" in query
        assert f'model_name="{model.name}"' in query
        assert f'namespace="{so["metadata"]["namespace"]}"' in query
        assert so["spec"]["minReplicaCount"] == model.engine.replicas
