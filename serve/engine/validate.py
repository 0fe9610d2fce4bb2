"""Checking a model file's engine flags with vLLM's own argument parser (works for GPU files on a CPU box)."""

from __future__ import annotations

import contextlib
import io

from serve.config.model_file import ModelFile
from serve.engine.command import engine_args


class EngineArgsError(Exception):
    """vLLM's parser refused the flags a model file produces."""


def check_engine_args(model: ModelFile) -> None:
    """Parse the engine flags exactly as vLLM's server would; raise EngineArgsError with vLLM's message."""
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        raise EngineArgsError(
            f"vLLM is not installed here ({exc.name}): install the cpu or gpu extra to check engine flags"
        ) from exc

    argv = [*engine_args(model, "/models/placeholder"), "--host", "127.0.0.1", "--port", "8000"]
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-server"))  # type: ignore[no-untyped-call]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()
        raise EngineArgsError(message[-1] if message else f"vLLM's parser exited with {exc.code}") from None
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineArgsError(str(exc)) from exc
