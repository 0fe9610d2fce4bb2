"""Container layout: the port every container listens on and where files live inside the images and pods.

The render step writes these into the manifests (serve.deploy.manifests) and the Dockerfiles' generated tails
(serve.deploy.images); no template under deploy/ spells them out.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from serve.config.gateway import GatewayFile
from serve.config.settings import env_name

Json = dict[str, Any]

# The gateway's own default port, for the gateway and the engines alike (each in its own pod).
PORT: int = GatewayFile.model_fields["port"].default
PORT_NAME = "http"
# Inside a container the processes listen on every interface; the pod network and NetworkPolicies bound them.
LISTEN_HOST = "0.0.0.0"

CONFIG = PurePosixPath("/etc/llmserve")
GATEWAY_CONFIG_DIR = CONFIG / "gateway"
GATEWAY_CONFIG = GATEWAY_CONFIG_DIR / "gateway.yaml"
# The gateway's copies of the model files, with the engines' headless Service added.
GATEWAY_MODELS_DIR = CONFIG / "models"
KEYS_DIR = CONFIG / "keys"
KEYS_FILE = KEYS_DIR / "keys.yaml"
# An engine pod's one model file.
MODEL_DIR = CONFIG / "model"
MODEL_FILE = MODEL_DIR / "model.yaml"
# Prepared weights (an emptyDir, or the shared model cache).
WEIGHTS = PurePosixPath("/models")
# The engines' HOME: vLLM's, torch's, Triton's and Hugging Face's caches.
CACHE = PurePosixPath("/cache")
TMP = PurePosixPath("/tmp")
SHM = PurePosixPath("/dev/shm")

# Where vLLM, torch, Triton and Hugging Face write: the root filesystem is read-only.
ENGINE_ENV = {
    "HOME": str(CACHE),
    "XDG_CACHE_HOME": str(CACHE / "xdg"),
    "XDG_CONFIG_HOME": str(CACHE / "config"),
    "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
    "VLLM_CONFIG_ROOT": str(CACHE / "config" / "vllm"),
    "TRITON_CACHE_DIR": str(CACHE / "triton"),
    "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "torchinductor"),
    "HF_MODULES_CACHE": str(CACHE / "hf-modules"),
    "NUMBA_CACHE_DIR": str(CACHE / "numba"),
    "OUTLINES_CACHE_DIR": str(CACHE / "outlines"),
    # Prepared weights live on the `models` volume, so the init container's work survives into the engine.
    "HF_HOME": str(WEIGHTS / "hf"),
    env_name("cache"): str(WEIGHTS / "llmserve"),
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
GATEWAY_HOME = TMP

# Each container's mounts: volume name -> (path, read-only). The templates define the volumes themselves.
GATEWAY_MOUNTS = {
    "config": (GATEWAY_CONFIG_DIR, True),
    "models": (GATEWAY_MODELS_DIR, True),
    # A directory mount, not subPath: the gateway reloads the keys file when the Secret changes.
    "keys": (KEYS_DIR, True),
    "tmp": (TMP, False),
}
PREPARE_MOUNTS = {"model": (MODEL_DIR, True), "models": (WEIGHTS, False), "cache": (CACHE, False), "tmp": (TMP, False)}
ENGINE_MOUNTS = {
    "model": (MODEL_DIR, True),
    "models": (WEIGHTS, True),
    "cache": (CACHE, False),
    "tmp": (TMP, False),
    # Tensor-parallel ranks exchange tensors through shared memory.
    "dshm": (SHM, False),
}
RAY_WORKER_MOUNTS = {"models": (WEIGHTS, True), "cache": (CACHE, False), "tmp": (TMP, False), "dshm": (SHM, False)}


def mounts(table: dict[str, tuple[PurePosixPath, bool]]) -> list[Json]:
    out: list[Json] = []
    for name, (path, read_only) in table.items():
        mount: Json = {"name": name, "mountPath": str(path)}
        if read_only:
            mount["readOnly"] = True
        out.append(mount)
    return out


def port() -> Json:
    return {"name": PORT_NAME, "containerPort": PORT}


def gateway_args() -> list[str]:
    return ["gateway", "--config", str(GATEWAY_CONFIG)]


def prepare_args() -> list[str]:
    return ["models", "prepare", str(MODEL_FILE)]


def engine_args() -> list[str]:
    return ["engine", str(MODEL_FILE), "--host", LISTEN_HOST, "--port", str(PORT)]
