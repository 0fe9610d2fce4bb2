"""The model file's `ray` section: the Ray cluster a model uses and, optionally, Ray Serve replicas."""

from __future__ import annotations

from pydantic import Field, model_validator

from serve.config.loader import Strict

# Ray Serve's OpenAI app has no /health; /v1/models is answered by its ingress replica through its HTTP proxy.
RAY_SERVE_HEALTH_PATH = "/v1/models"


class Autoscaling(Strict):
    """Ray Serve autoscaling of the engine replicas (Ray Serve's autoscaling_config)."""

    # At least one: the gateway has to see a healthy ingress to route to it, and a cold start takes minutes.
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=1, ge=1)
    # Requests in flight per replica that Ray Serve aims for; above it, it adds replicas.
    target_ongoing_requests: float = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self


class RayServeSettings(Strict):
    """Run the replicas as a Ray Serve LLM application (ray.serve.llm) instead of local vLLM processes."""

    # Ray Serve's HTTP port on 127.0.0.1; None picks a free one (Ray's default, 8000, is the gateway's).
    port: int | None = Field(default=None, ge=1, le=65535)
    # Without it, engine.replicas is a fixed number of replicas.
    autoscaling: Autoscaling | None = None


class RaySettings(Strict):
    """Where the Ray cluster is: for vLLM's Ray executor (engine.distributed_executor_backend: ray) or Ray Serve."""

    # A running cluster's address as `ray start` prints it (host:6379) or "auto"; unset: the RAY_ADDRESS
    # environment variable, else (Ray Serve only) a one-node cluster on loopback that `up` starts and stops.
    address: str | None = Field(default=None, min_length=1)
    # Logical CPUs of that local cluster. More than the cores: a vLLM CPU replica reserves two, and the ingress
    # and the Serve controller need room beside it (measured: with the real core count the ingress is never placed).
    local_num_cpus: int = Field(default=4, ge=1)
    serve: RayServeSettings | None = None
