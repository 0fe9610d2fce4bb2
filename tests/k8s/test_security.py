"""Security properties of every rendered pod: non-root, read-only root, no capabilities, no tokens, no secrets."""

from __future__ import annotations

import re

from tests.k8s.rendering import Obj, PodTemplate, env_of, named, of_kind, pod_templates

# Where processes in the pods write; each must be on a writable volume because the root filesystem is read-only.
CACHE_VARS = (
    "HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "VLLM_CACHE_ROOT",
    "VLLM_CONFIG_ROOT",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "HF_MODULES_CACHE",
    "NUMBA_CACHE_DIR",
    "OUTLINES_CACHE_DIR",
)
# The init container writes the prepared weights.
PREPARE_VARS = ("HF_HOME", "LLMSERVE_CACHE")
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL|REDIS_URL)", re.IGNORECASE)


def writable(template: PodTemplate, container: Obj, path: str) -> bool:
    for mount in container.get("volumeMounts", []):
        if (path + "/").startswith(mount["mountPath"].rstrip("/") + "/") and not mount.get("readOnly", False):
            volume = next(v for v in template.spec["volumes"] if v["name"] == mount["name"])
            return "configMap" not in volume and "secret" not in volume
    return False


def test_every_container_is_locked_down(objs: list[Obj]) -> None:
    templates = pod_templates(objs)
    assert templates
    for t in templates:
        pod = t.spec.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", t.owner
        assert pod.get("runAsNonRoot") is True, t.owner
        assert pod.get("runAsUser", 1) != 0 and pod.get("runAsGroup", 1) != 0, t.owner
        assert not t.spec.get("hostNetwork") and not t.spec.get("hostPID") and not t.spec.get("hostIPC"), t.owner
        for c in t.all_containers:
            sc = c.get("securityContext", {})
            where = f"{t.owner} container {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault", where
        for volume in t.spec.get("volumes", []):
            assert "hostPath" not in volume, f"{t.owner} mounts a host path"


def test_caches_and_tmp_are_writable_volumes(objs: list[Obj]) -> None:
    for t in pod_templates(objs):
        for c in t.all_containers:
            where = f"{t.owner} container {c['name']}"
            assert writable(t, c, "/tmp"), f"{where}: /tmp is not a writable volume"
            env = env_of(objs, c)
            wanted = CACHE_VARS if t.component.startswith("engine") else ("HOME",)
            if c["name"] == "prepare":
                wanted += PREPARE_VARS
            for var in wanted:
                assert var in env, f"{where}: {var} is not set"
                assert writable(t, c, env[var]), f"{where}: {var}={env[var]} is not on a writable volume"


def test_no_service_account_token_is_mounted(objs: list[Obj]) -> None:
    for sa in of_kind(objs, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    accounts = {sa["metadata"]["name"] for sa in of_kind(objs, "ServiceAccount")}
    for t in pod_templates(objs):
        assert t.spec.get("automountServiceAccountToken") is False, t.owner
        assert t.spec.get("serviceAccountName") in accounts, f"{t.owner} runs as the default service account"


def test_no_secret_is_committed(objs: list[Obj]) -> None:
    """Secrets are referenced (keys file, engine key, Hugging Face token), never shipped with data."""
    for s in of_kind(objs, "Secret"):
        assert not s.get("data") and not s.get("stringData"), f"Secret {s['metadata']['name']} carries data"
    referenced = set()
    for t in pod_templates(objs):
        for c in t.all_containers:
            for var in c.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, f"{t.owner}: {var['name']} has a literal value"
                    referenced.add(var["valueFrom"]["secretKeyRef"]["name"])
            for source in c.get("envFrom", []):
                cm = named(objs, "ConfigMap", source["configMapRef"]["name"])
                leaked = [k for k in cm["data"] if SECRET_NAME.search(k)]
                assert not leaked, f"ConfigMap {cm['metadata']['name']} holds {leaked}"
        referenced |= {v["secret"]["secretName"] for v in t.spec.get("volumes", []) if "secret" in v}
    assert {"llmserve-engine-key", "llmserve-gateway-keys", "llmserve-hf-token"} <= referenced


def test_namespace_enforces_restricted_pod_security(objs: list[Obj]) -> None:
    (ns,) = of_kind(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {ns["metadata"]["name"]}


def test_images_are_pinned(objs: list[Obj]) -> None:
    for t in pod_templates(objs):
        for c in t.all_containers:
            image = c["image"]
            where = f"{t.owner} container {c['name']}: {image}"
            if "@sha256:" in image:
                continue
            name, _, tag = image.rpartition(":")
            assert "/" in image and name and "/" not in tag, f"{where}: no tag"
            assert tag != "latest" and re.search(r"\d", tag), f"{where}: not an exact tag"
