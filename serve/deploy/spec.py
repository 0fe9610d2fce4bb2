"""An overlay's render input: the gateway settings and model files its generated manifests come from."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from serve.config.loader import Strict, load_model

# Next to an overlay's kustomization.yaml; its presence makes a directory an overlay the render step writes.
SPEC_FILE = "llmserve.yaml"


class Autoscale(Strict):
    """Engine replicas follow vLLM's queue (vllm:num_requests_waiting), read from Prometheus by a KEDA ScaledObject."""

    prometheus: str = Field(pattern=r"^https?://")
    max_replicas: int = Field(ge=1)
    # Target queue length per engine replica: KEDA runs ceil(total waiting / this) replicas.
    waiting_per_replica: int = Field(gt=0)


class ModelDeploy(Strict):
    """A model file this overlay serves, relative to the repository root."""

    file: Path
    autoscale: Autoscale | None = None


class OverlaySpec(Strict):
    # Images are <registry>/gateway, <registry>/engine-gpu and <registry>/engine-cpu, tagged with the package version.
    registry: str = Field(pattern=r"^[a-z0-9][a-z0-9.:/_-]*[a-z0-9]$")
    gateway: Path = Path("configs/gateway.yaml")
    models: list[ModelDeploy] = Field(min_length=1)


def load_overlay_spec(path: Path) -> OverlaySpec:
    return load_model(OverlaySpec, path)
