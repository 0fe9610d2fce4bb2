"""`llmserve adapters`: load, unload and list LoRA adapters on a running stack, without a restart.

The commands call the gateway's admin routes (serve/gateway/adapters_admin.py) on loopback with the engine key,
both found in the state folder that `up` keeps: the gateway loads the adapter on every replica of its base model
through vLLM's own API, then serves the name; an unload waits for the requests in flight on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve.config.loader import ConfigError
from serve.config.settings import ENGINE_KEY_ENV, StateFolder, environment
from serve.models.prepare import HF_ID

# An unload waits for the requests in flight on the adapter, which the model's total timeout bounds.
ADMIN_TIMEOUT_SECONDS = 1800.0
ANY_ADDRESS = {"0.0.0.0", "::", ""}


def gateway_url(state: StateFolder) -> str:
    """The running stack's gateway, from the settings `up` wrote for it (reached on loopback)."""
    path = state.runtime_gateway
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no running stack here (start one with `llmserve up`, or pass --gateway)") from None
    host = str(data.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host in ANY_ADDRESS else host
    return f"http://[{host}]:{data.get('port')}" if ":" in host else f"http://{host}:{data.get('port')}"


def engine_key(state: StateFolder) -> str:
    env = environment().engine_key
    if env is not None:
        return env.get_secret_value()
    try:
        return state.engine_key.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no engine key: set {ENGINE_KEY_ENV} or run where `up` keeps {state.engine_key}") from None


def adapter_source(value: str) -> str:
    """A folder becomes absolute (the engines run from another working directory); a Hugging Face id stays."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{path}: not a PEFT adapter folder (adapter_config.json is missing)")
        return str(path.resolve())
    if HF_ID.match(value) and not value.startswith((".", "/", "~")):
        return value
    raise ConfigError(f"{value}: no such folder, and not a Hugging Face id (org/name)")


def call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    state = environment().state
    url = (args.gateway or gateway_url(state)).rstrip("/") + path
    headers = {"authorization": f"Bearer {engine_key(state)}"}
    try:
        resp = httpx.request(method, url, json=body, headers=headers, timeout=ADMIN_TIMEOUT_SECONDS, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway at {url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    try:
        data = resp.json()
    except ValueError:
        data = {"error": {"message": resp.text}}
    if resp.status_code != 200:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else resp.text
        print(f"error: HTTP {resp.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    body = {"name": args.name, "source": adapter_source(args.source), "model": args.model}
    return call(args, "POST", "/admin/adapters", body)


def cmd_unload(args: argparse.Namespace) -> int:
    return call(args, "DELETE", f"/admin/adapters/{args.name}")


def cmd_list(args: argparse.Namespace) -> int:
    return call(args, "GET", "/admin/adapters")


def add_adapters_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    adapters = sub.add_parser("adapters", help="load and unload LoRA adapters on a running stack")
    commands = adapters.add_subparsers(dest="adapters_command", required=True)
    load = commands.add_parser("load", help="load NAME from PATH (a PEFT folder or a Hugging Face id)")
    load.add_argument("name")
    load.add_argument("source", metavar="PATH")
    load.add_argument("--model", required=True, help="the base model's served name")
    load.set_defaults(func=cmd_load)
    unload = commands.add_parser("unload", help="stop serving NAME once its requests in flight finish")
    unload.add_argument("name")
    unload.set_defaults(func=cmd_unload)
    listing = commands.add_parser("list", help="adapters the gateway serves, and the engines holding each")
    listing.set_defaults(func=cmd_list)
    for command in (load, unload, listing):
        command.add_argument("--gateway", help="the gateway's URL (default: the running stack's, on loopback)")
