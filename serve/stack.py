"""`up`: prepare models, start engines, wait for health, start the gateway, supervise, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serve.config.gateway import GatewayFile, ModelEntry, keys_path
from serve.config.keys import create_key, digest, load_keys
from serve.config.model_file import ModelFile
from serve.config.settings import ENGINE_KEY_ENV, StateFolder, environment
from serve.engine.command import build_engine_command
from serve.engine.placement import format_cpus, gateway_cpus
from serve.engine.process import (
    ChildProcess,
    ProcessStartError,
    die_with_parent,
    free_port,
    restart_with_backoff,
)
from serve.engine.progress import Screen, StartProgress, shown
from serve.models.prepare import ModelPrepareError, prepare_model
from serve.ray.cluster import RAY_ADDRESS_ENV, RayClusterError, check_ray_executor
from serve.ray.launch import RAY_STOP_SECONDS, ray_serve_child, wait_deployed

log = logging.getLogger(__name__)


@dataclass
class Engine:
    model: ModelFile
    url: str
    child: ChildProcess
    # Ray Serve: the runner writes it once the application runs (its proxy answers long before).
    ready_file: Path | None = None

    @property
    def health_url(self) -> str:
        return self.url + self.model.policy.routing.health_path

    async def wait_ready(self) -> None:
        if self.ready_file is not None:
            await wait_deployed(self.child, self.ready_file, self.model.engine.startup_timeout)
        await self.child.wait_healthy(self.health_url, self.model.engine.startup_timeout)


@dataclass
class Stack:
    # Relative paths in it are already resolved (serve.config.gateway.load_gateway_file).
    gateway_file: GatewayFile
    models: list[tuple[Path, ModelFile]]
    state: StateFolder
    engines: list[Engine] = field(default_factory=list)
    gateway: ChildProcess | None = None
    # Prepared weights folder per served name: the gateway counts prompt tokens with its tokenizer.
    weights: dict[str, Path] = field(default_factory=dict)

    @property
    def keys_path(self) -> Path:
        """Where the dev key is added and the gateway looks keys up: the gateway file's, else the state folder's."""
        return keys_path(self.gateway_file, Path.cwd(), self.state).absolute()


def ensure_dev_key(keys_path: Path, key_path: Path) -> str:
    """The key `make run` prints: created once, stored hashed in the keys file, plain in a 0600 file."""
    if key_path.exists():
        plain = key_path.read_text().strip()
        if any(record.sha256 == digest(plain) for record in load_keys(keys_path).keys):
            return plain
    plain, record = create_key(keys_path, name="dev")
    write_private(key_path, plain)
    log.info("created API key %s; the plain key is in %s", record.id, key_path)
    return plain


def write_private(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")


def engine_key_for(state: StateFolder) -> str:
    """The engines' internal key: from the environment, else kept in a 0600 file of the state folder, so that
    tools on this machine (`llmserve bench compare`) can reach the engines of a running `up` directly."""
    if secret := environment().engine_key:
        return secret.get_secret_value()
    path = state.engine_key
    if path.exists() and (existing := path.read_text().strip()):
        return existing
    key = secrets.token_urlsafe(32)
    write_private(path, key)
    return key


def banner(url: str, key: str, key_path: Path, models: list[ModelFile]) -> str:
    model = models[0].name
    names = ", ".join(name for m in models for name in m.names)
    return f"""
llmserve is ready at {url}/v1   (models: {names})
API key (also in {key_path}): {key}

  curl {url}/v1/chat/completions \\
    -H "Authorization: Bearer $(cat {key_path})" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  # Python, with the official OpenAI SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key=open("{key_path}").read().strip())
  reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi!"}}])
  print(reply.choices[0].message.content)

Ctrl-C drains the gateway and stops every engine.
"""


async def start_engines(stack: Stack, engine_key: str) -> None:
    for path, model in stack.models:
        folder = await asyncio.to_thread(prepare_model, model)
        stack.weights[model.name] = folder
        weights = str(folder)
        if model.ray is not None and model.ray.serve is not None:
            # Ray Serve runs every replica; the gateway sees one endpoint, its ingress.
            run = ray_serve_child(model, path, weights, stack.state.root, {stack.gateway_file.port})
            stack.engines.append(Engine(model=model, url=run.url, child=run.child, ready_file=run.ready_file))
            continue
        ray_env: dict[str, str] = {}
        if model.engine.distributed_executor_backend == "ray":
            ray_env[RAY_ADDRESS_ENV] = await asyncio.to_thread(check_ray_executor, model)
        for replica in range(model.engine.replicas):
            port = free_port()
            cmd = build_engine_command(model, weights, "127.0.0.1", port)
            child = ChildProcess(
                name=f"engine {model.name}#{replica}",
                argv=cmd.argv,
                env={**cmd.env, **ray_env, "VLLM_API_KEY": engine_key},
                log_path=stack.state.logs / f"engine-{model.name.replace('/', '_')}-{replica}.log",
            )
            stack.engines.append(Engine(model=model, url=f"http://127.0.0.1:{port}", child=child))
    screen = Screen(sys.stderr)
    several = len(stack.engines) > 1
    # Made before the engines start: each reads its log from where this start begins.
    progress = [StartProgress(e.child.name if several else "engine", e.child.log_path, screen) for e in stack.engines]
    for engine in stack.engines:
        await engine.child.start()
    print(f"waiting for {len(stack.engines)} engine(s); logs in {stack.state.logs}", file=sys.stderr)
    waits = [asyncio.create_task(wait_ready_shown(e, p)) for e, p in zip(stack.engines, progress, strict=True)]
    try:
        await asyncio.gather(*waits)
    finally:
        # One engine failed, or `up` was stopped: stop waiting for the others too (and showing their progress).
        for task in waits:
            task.cancel()
        if waits:
            await asyncio.wait(waits)


async def wait_ready_shown(engine: Engine, progress: StartProgress) -> None:
    async with shown(progress):
        await engine.wait_ready()


def write_runtime_config(stack: Stack) -> Path:
    """The gateway's settings for this run: the model files and the engines just started for them."""
    entries = [
        ModelEntry(
            file=path.resolve(),
            endpoints=[e.url for e in stack.engines if e.model is model],
            tokenizer=stack.weights.get(model.name),
        )
        for path, model in stack.models
    ]
    # Absolute paths: the gateway may run from another folder, and LLMSERVE_HOME may change in its environment.
    runtime = stack.gateway_file.model_copy(update={"models": entries, "keys_file": stack.keys_path})
    path = stack.state.runtime_gateway
    path.parent.mkdir(parents=True, exist_ok=True)
    # It may hold a Redis URL with a password: readable by the user only, whatever the umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(yaml.safe_dump(runtime.model_dump(mode="json"), sort_keys=False))
    return path


async def keep_alive(engine: Engine, stop: asyncio.Event) -> None:
    """Restart the engine each time it dies (the gateway marks it down meanwhile), until the stack stops."""
    while not stop.is_set():
        code = await engine.child.wait()
        if stop.is_set():
            return
        log.error("%s exited with code %s; restarting it", engine.child.name, code)
        await restart_with_backoff(engine.child, engine.health_url, engine.model.engine.startup_timeout, stop.is_set)


async def supervise(stack: Stack, stop: asyncio.Event) -> int:
    """Keep every engine alive; return when asked to stop (0) or when the gateway exits (1)."""
    assert stack.gateway is not None
    keepers = [asyncio.create_task(keep_alive(e, stop)) for e in stack.engines]
    gateway_wait = asyncio.ensure_future(stack.gateway.wait())
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({gateway_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.error("the gateway exited with code %s: stopping the stack", gateway_wait.result())
            return 1
        return 0
    finally:
        for task in (*keepers, gateway_wait, stop_wait):
            task.cancel()
        for task in keepers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("supervising %s failed: %s", task.get_name(), task.exception())


async def shutdown(stack: Stack) -> None:
    """Drain the gateway first (it finishes requests in flight), then stop the engines."""
    if stack.gateway is not None:
        # The drain deadline, uvicorn's last 5 s for closing connections, and a margin for the lifespan's teardown.
        await stack.gateway.stop(grace=stack.gateway_file.drain_timeout + 15)
    # A Ray Serve runner also stops Ray Serve and the local cluster it started: give it longer.
    await asyncio.gather(
        *(
            e.child.stop(grace=e.model.engine.shutdown_timeout + (RAY_STOP_SECONDS + 10 if e.ready_file else 10))
            for e in stack.engines
        )
    )


def gateway_placement(stack: Stack) -> set[int] | None:
    """The CPUs for the gateway: off those the engines' threads are bound to (serve.engine.placement)."""
    # CPU engines only: a GPU engine's threads may be bound near its GPU, which says nothing of the model's cores.
    pids = [
        pid for engine in stack.engines if engine.model.engine.device == "cpu" and (pid := engine.child.pid) is not None
    ]
    if not pids:
        return None
    try:
        cpus = gateway_cpus(pids)
    except (OSError, AttributeError) as exc:  # no /proc, or no sched_getaffinity: the gateway is not pinned
        log.info("cannot read where the engines run (%s): the gateway is not pinned", exc)
        return None
    if cpus is not None:
        print(f"gateway on {format_cpus(cpus)}, off the cores the engines' threads are bound to", file=sys.stderr)
    return cpus


async def run_stack(stack: Stack) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    die_with_parent()
    key_path = stack.state.dev_key
    plain = ensure_dev_key(stack.keys_path, key_path)
    engine_key = engine_key_for(stack.state)
    try:
        starting = asyncio.ensure_future(start_engines(stack, engine_key))
        stop_wait = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            starting.cancel()
            return 130
        stop_wait.cancel()
        starting.result()
        runtime = write_runtime_config(stack)
        stack.gateway = ChildProcess(
            name="gateway",
            argv=[sys.executable, "-m", "serve.cli", "gateway", "--config", str(runtime)],
            env={ENGINE_KEY_ENV: engine_key},
            log_path=None,
            cpus=gateway_placement(stack),
        )
        await stack.gateway.start()
        url = f"http://{stack.gateway_file.host}:{stack.gateway_file.port}"
        await stack.gateway.wait_healthy(f"{url}/readyz", within=60, interval=0.25)
        print(banner(url, plain, key_path, [m for _, m in stack.models]), flush=True)
        return await supervise(stack, stop)
    except (ProcessStartError, ModelPrepareError, RayClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await shutdown(stack)
        print("llmserve stopped; no engine left running", file=sys.stderr)
