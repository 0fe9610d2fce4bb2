"""The `llmserve` command: up, gateway, engine, models, keys, adapters, config check, k8s, bench."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from serve.config.gateway import GatewayFile, GatewaySettings, build_settings, load_gateway_file
from serve.config.keys import create_key, load_keys, revoke_key
from serve.config.loader import ConfigError
from serve.config.model_file import load_model_file
from serve.config.settings import DEFAULT_MODEL_FILE, env_name, environment
from serve.logs import setup_logging
from serve.models.prepare import ModelPrepareError

if TYPE_CHECKING:
    from serve.stack import Stack

# Read when it exists; without it every setting has its default (serve/config/gateway.py).
DEFAULT_GATEWAY = Path("configs/gateway.yaml")


def gateway_file_arg(path: str | None) -> tuple[GatewayFile, Path]:
    """The gateway file a command names (it must exist), else configs/gateway.yaml if there is one; and the
    folder its relative paths start at."""
    if path is not None:
        return load_gateway_file(Path(path)), Path(path).parent
    if DEFAULT_GATEWAY.exists():
        return load_gateway_file(DEFAULT_GATEWAY), DEFAULT_GATEWAY.parent
    return GatewayFile(), Path.cwd()


def stack_for(args: argparse.Namespace) -> Stack:
    """What `up` runs: the gateway file with the address from the flags or the environment, the model files."""
    from serve.stack import Stack

    env = environment()
    gateway, _ = gateway_file_arg(args.gateway_config)
    address = {
        "host": next(v for v in (args.host, env.host, gateway.host) if v is not None),
        "port": next(v for v in (args.port, env.port, gateway.port) if v is not None),
    }
    models = [(Path(path), load_model_file(path)) for path in args.model or [env.model]]
    for path, model in models:
        if model.endpoints or model.discovery is not None:
            # The gateway would route to those instead of (or, with discovery, drop) the engines `up` starts.
            raise ConfigError(f"{path}: endpoints and discovery are for `llmserve gateway`; `up` runs its own engines")
    return Stack(gateway_file=gateway.model_copy(update=address), models=models, state=env.state)


def cmd_up(args: argparse.Namespace) -> int:
    from serve.stack import run_stack

    return asyncio.run(run_stack(stack_for(args)))


def gateway_settings_for(args: argparse.Namespace) -> GatewaySettings:
    """What `llmserve gateway` serves: its file, with --host, --port and --workers over the file's."""
    file, base_dir = gateway_file_arg(args.config)
    flags = (("host", args.host), ("port", args.port), ("workers", args.workers))
    update = {name: value for name, value in flags if value is not None}
    return build_settings(file.model_copy(update=update), base_dir=base_dir)


def cmd_gateway(args: argparse.Namespace) -> int:
    from serve.gateway.run import run_gateway

    run_gateway(gateway_settings_for(args))
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    """Run one engine in the foreground (containers): exec vLLM with the flags built from the model file."""
    from serve.engine.command import build_engine_command
    from serve.models.prepare import prepare_model

    model = load_model_file(args.model_file)
    if model.ray is not None and model.ray.serve is not None:
        # Ray Serve starts and places the engines itself; one vLLM process here would serve something else.
        print(f"error: {args.model_file} runs on Ray Serve (ray.serve): start it with `llmserve up`", file=sys.stderr)
        return 2
    weights = args.weights or str(prepare_model(model))
    cmd = build_engine_command(model, weights, args.host, args.port)
    if args.print:
        print(" ".join(cmd.argv))
        return 0
    os.execvpe(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from serve.models.prepare import prepare_model, prepare_source

    if args.ref.endswith((".yaml", ".yml")) and Path(args.ref).is_file():
        path = prepare_model(load_model_file(args.ref))
    else:
        path = prepare_source(args.ref)
    print(path)
    return 0


def expiry_from_args(args: argparse.Namespace) -> datetime | None:
    if args.ttl_days is not None:
        return datetime.now(UTC).replace(microsecond=0) + timedelta(days=args.ttl_days)
    if args.expires is None:
        return None
    try:
        expires = datetime.fromisoformat(args.expires)
    except ValueError as exc:
        raise ConfigError(f"--expires: not an ISO 8601 date or time: {args.expires!r}") from exc
    expires = expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)
    if expires <= datetime.now(UTC):
        raise ConfigError(f"--expires: {expires.isoformat()} is already past")
    return expires


def cmd_keys_create(args: argparse.Namespace) -> int:
    models = [m for m in (args.models or "").split(",") if m]
    plain, record = create_key(
        Path(args.keys_file),
        name=args.name,
        models=models,
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrency=args.max_concurrency,
        expires=expiry_from_args(args),
        priority=args.priority,
        weight=args.weight,
    )
    print(f"created {record.id} ({record.name}); the key is shown only once:\n{plain}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    def limit(value: int | None) -> str:
        return "-" if value is None else str(value)

    now = datetime.now(UTC)
    print("id\tname\tmodels\tstate\trpm\ttpm\tconcurrency\texpires\tcreated")
    for record in load_keys(Path(args.keys_file)).keys:
        models = ",".join(record.models) or "*"
        state = "disabled" if record.disabled else "expired" if record.expired(now) else "active"
        expires = record.expires.isoformat() if record.expires else "-"
        print(
            f"{record.id}\t{record.name}\t{models}\t{state}\t{limit(record.rpm)}\t{limit(record.tpm)}"
            f"\t{limit(record.max_concurrency)}\t{expires}\t{record.created.isoformat()}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not revoke_key(Path(args.keys_file), args.id):
        print(f"error: no key with id {args.id}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


def cmd_keys_check(args: argparse.Namespace) -> int:
    """Validate the keys file as the gateway reads it: a broken or missing file is an error (exit 2)."""
    path = Path(args.keys_file)
    keys = load_keys(path, missing_ok=False)
    now = datetime.now(UTC)
    print(f"{path}: {len(keys.keys)} keys, {sum(record.usable(now) for record in keys.keys)} usable")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from serve.engine.validate import EngineArgsError, check_engine_args

    failed = 0
    for path in args.files:
        try:
            model = load_model_file(path)
            if not args.no_engine:
                check_engine_args(model)
        except (ConfigError, EngineArgsError) as exc:
            print(f"FAIL {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"ok   {path} ({model.name}, {model.engine.device}, TPxPP={model.engine.world_size})")
    return 1 if failed else 0


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmserve", description="LLM serving on vLLM behind an OpenAI-compatible gateway")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start engines and the gateway; Ctrl-C drains and stops everything")
    up.add_argument(
        "--model",
        action="append",
        help=f"model file (repeatable; default {DEFAULT_MODEL_FILE}, env {env_name('model')})",
    )
    up.add_argument("--host", help=f"gateway host (env {env_name('host')}; default: the gateway file's)")
    up.add_argument("--port", type=int, help=f"gateway port (env {env_name('port')}; default: the gateway file's)")
    up.add_argument("--gateway-config", help=f"gateway settings (default: {DEFAULT_GATEWAY} if it exists)")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run the gateway alone (engines elsewhere)")
    gw.add_argument("--config", help=f"gateway settings (default: {DEFAULT_GATEWAY} if it exists)")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument(
        "--workers", type=positive_int, help="gateway processes sharing the port (default: the file's `workers`, 1)"
    )
    gw.set_defaults(func=cmd_gateway)

    eng = sub.add_parser("engine", help="run one vLLM engine for a model file in the foreground")
    eng.add_argument("model_file")
    eng.add_argument("--host", default="127.0.0.1")
    eng.add_argument("--port", type=int, default=8100)
    eng.add_argument("--weights", help="use this folder instead of preparing the model's source")
    eng.add_argument("--print", action="store_true", help="print the command line instead of running it")
    eng.set_defaults(func=cmd_engine)

    models = sub.add_parser("models", help="prepare weights").add_subparsers(dest="models_command", required=True)
    prep = models.add_parser("prepare", help="NAME | PATH | HF_ID | model file")
    prep.add_argument("ref")
    prep.set_defaults(func=cmd_models_prepare)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    keys_file = str(environment().state.keys_file)
    kc = keys.add_parser("create")
    kc.add_argument("--name", required=True)
    kc.add_argument("--models", help="comma-separated model names or aliases (default: all)")
    kc.add_argument("--rpm", type=positive_int, help="requests per minute (default: unlimited)")
    kc.add_argument("--tpm", type=positive_int, help="tokens per minute, prompt + completion (default: unlimited)")
    kc.add_argument("--max-concurrency", type=positive_int, help="requests in flight at once (default: unlimited)")
    kc.add_argument(
        "--priority",
        choices=["interactive", "standard", "batch"],
        help="class when a model's engines are full: interactive first, batch last (default: standard)",
    )
    kc.add_argument(
        "--weight", type=positive_float, help="share of its class's tokens, against the class's other keys (default: 1)"
    )
    expiry = kc.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires", help="expiry as ISO 8601, e.g. 2030-01-31 or 2030-01-31T12:00:00+02:00 (UTC if no offset)"
    )
    expiry.add_argument("--ttl-days", type=positive_int, help="expire this many days from now")
    kl = keys.add_parser("list")
    kr = keys.add_parser("revoke")
    kr.add_argument("id")
    kk = keys.add_parser("check", help="validate the keys file; non-zero exit if it is broken or missing")
    for sp, func in ((kc, cmd_keys_create), (kl, cmd_keys_list), (kr, cmd_keys_revoke), (kk, cmd_keys_check)):
        sp.add_argument("--keys-file", default=keys_file)
        sp.set_defaults(func=func)

    config = sub.add_parser("config", help="validate files").add_subparsers(dest="config_command", required=True)
    check = config.add_parser("check", help="validate model files, engine flags through vLLM's own parser")
    check.add_argument("files", nargs="+")
    check.add_argument("--no-engine", action="store_true", help="skip the vLLM parser (when vLLM is not installed)")
    check.set_defaults(func=cmd_config_check)

    from serve.deploy.cli import add_k8s_parser

    add_k8s_parser(sub)

    from serve.bench import add_bench_parser

    add_bench_parser(sub)

    from serve.adapters_cli import add_adapters_parser

    add_adapters_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        # The parser shows defaults from the environment (the state folder), so a wrong variable stops it too.
        args = parser().parse_args(argv)
        if args.command != "gateway":
            setup_logging("info")
        result: int = args.func(args)
    except (ConfigError, ModelPrepareError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
