"""A model file as a Ray Serve LLM application config (ray.serve.llm's LLMConfig and LLMServingArgs)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any

from serve.config.model_file import ModelFile
from serve.engine.command import engine_args, engine_env

# Ray Serve LLM sets these from model_loading_config; they must not come twice.
OWNED_BY_RAY = frozenset({"model", "served_model_name"})


class RayServeConfigError(Exception):
    """The model file's engine settings cannot become Ray Serve engine_kwargs."""


def engine_kwargs(model: ModelFile, weights: str) -> dict[str, Any]:
    """The engine flags `up` would pass to vLLM, parsed by vLLM's own parser into engine arguments.

    Going through the flags keeps one translation of the model file (extra_args included); only values that
    differ from vLLM's defaults are kept, so Ray Serve's own defaults for the rest still apply.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-server"))  # type: ignore[no-untyped-call]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(engine_args(model, weights))
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        raise RayServeConfigError(f"{model.name}: {lines[-1] if lines else 'vLLM refused the flags'}") from None
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)} - OWNED_BY_RAY
    return {k: v for k, v in vars(args).items() if k in fields and v != parser.get_default(k)}


def deployment_config(model: ModelFile) -> dict[str, Any]:
    serve = model.ray.serve if model.ray else None
    scaling = serve.autoscaling if serve else None
    if scaling is None:
        replicas = model.engine.replicas
        return {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas}}
    return {
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    }


def llm_config(model: ModelFile, weights: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One LLMConfig (as the dict Ray validates) for a model file whose weights are at `weights`."""
    return {
        "model_loading_config": {"model_id": model.name, "model_source": weights},
        "engine_kwargs": kwargs,
        # Ray infers GPUs when this is missing; vLLM's CPU build needs the CPU kind to place its replicas.
        "accelerator_config": {"kind": "cpu" if model.engine.device == "cpu" else "gpu"},
        "deployment_config": deployment_config(model),
        "runtime_env": {"env_vars": engine_env(model)},
    }


def serving_args(model: ModelFile, weights: str) -> dict[str, Any]:
    """The argument of ray.serve.llm.build_openai_app: this model behind Ray's OpenAI-compatible ingress."""
    return {"llm_configs": [llm_config(model, weights, engine_kwargs(model, weights))]}
