"""The gateway benchmark's processes: the instant upstream and a gateway per source tree, pinned, ready, stopped."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Each source tree serves its own copy of the bundled model's file, so both see the policy `up` would apply.
MODEL_FILE = Path("configs") / "models" / "smollm2-135m-cpu.yaml"
ENGINE_KEY = "bench-engine-key"
START_TIMEOUT = 90.0
# Names the report already uses for a target or a process.
RESERVED = frozenset({"direct", "upstream", "wrk", "bench"})


@dataclass
class Target:
    name: str
    url: str
    log: Path
    # The client key it accepts (the upstream accepts any).
    key: str = "sk-llms-direct"
    src: Path | None = None
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Processes:
    upstream: Target
    gateways: list[Target] = field(default_factory=list)

    @property
    def targets(self) -> list[Target]:
        return [self.upstream, *self.gateways]

    def pids(self) -> dict[str, int]:
        """Process ids by the names the report uses: "upstream", and each gateway's label."""
        pids = {g.name: g.proc.pid for g in self.gateways if g.proc is not None}
        if self.upstream.proc is not None:
            pids["upstream"] = self.upstream.proc.pid
        return pids


def free_port() -> int:
    from serve.engine.process import free_port as launcher_port

    return launcher_port()


def default_tokenizer() -> Path:
    """The bundled SmolLM2's prepared folder, as `up` hands it to the gateway (prepared once, ~20 s)."""
    from serve.config.model_file import load_model_file
    from serve.models.prepare import prepare_model

    return prepare_model(load_model_file(ROOT / MODEL_FILE))


def tree_label(src: Path, taken: set[str]) -> str:
    name = src.name or "gateway"
    label, n = name, 2
    while label in taken or label in RESERVED:
        label, n = f"{name}-{n}", n + 1
    taken.add(label)
    return label


def tree_commit(src: Path) -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def pinned(cpu: int, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        # stdout is the gateway's access log: off, as `up` runs the gateway with its log level above INFO.
        return subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err
        )


def wait_ready(target: Target, path: str) -> None:
    assert target.proc is not None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(target.url + path, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if target.proc.poll() is not None or time.monotonic() > deadline:
            tail = target.log.read_text(errors="replace")[-3000:] if target.log.exists() else ""
            raise RuntimeError(f"{target.name} did not get ready at {target.url}{path}:\n{tail}")
        time.sleep(0.1)


def gateway_config(folder: Path, src: Path, port: int, upstream: str, keys: Path, tokenizer: Path) -> Path:
    """Only fields every source tree's GatewayFile accepts."""
    data = {
        "host": "127.0.0.1",
        "port": port,
        "keys_file": str(keys),
        "log_level": "warning",
        "drain_timeout": 5,
        "models": [{"file": str(src / MODEL_FILE), "endpoints": [upstream], "tokenizer": str(tokenizer)}],
    }
    path = folder / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tree_key(src: Path, keys: Path) -> str:
    """A key added to a keys file by the tree's own code, so its gateway reads the file in the format it knows."""
    code = (
        "import sys, pathlib; from serve.config.keys import create_key; "
        "print(create_key(pathlib.Path(sys.argv[1]), 'bench')[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", code, str(keys)], cwd=src, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{src}: could not create a key: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def gateway_target(
    folder: Path, src: Path, upstream_url: str, tokenizer: Path, taken: set[str]
) -> tuple[Target, list[str], dict[str, str]]:
    """A gateway of the source tree `src` in front of the upstream: its target (with a key of its own), the command
    that runs it and its environment."""
    port = free_port()
    keys = folder / f"keys-{port}.yaml"
    config = gateway_config(folder, src, port, upstream_url, keys, tokenizer)
    gw = Target(tree_label(src, taken), f"http://127.0.0.1:{port}", folder / f"gw-{port}.log", src=src)
    gw.key = tree_key(src, keys)
    # The tree's own directory first on sys.path: `python -m` from it runs its serve/, not the installed one.
    env = {**os.environ, "PYTHONPATH": str(src), "LLMSERVE_ENGINE_KEY": ENGINE_KEY}
    return gw, [sys.executable, "-m", "serve.cli", "gateway", "--config", str(config)], env


@contextmanager
def started(args: argparse.Namespace, folder: Path, model: str, sources: list[Path]) -> Iterator[Processes]:
    tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    port = free_port()
    up = Target("direct", f"http://127.0.0.1:{port}", folder / "upstream.log")
    argv = [sys.executable, "-m", "loadtests.instant_upstream", "--port", str(port), "--model", model]
    procs = Processes(up)
    with ExitStack() as stack:
        stack.callback(stop_all, procs)
        argv += ["--events", str(args.events), "--server", args.upstream]
        up.proc = pinned(args.load_cpu, argv, ROOT, dict(os.environ), up.log)
        taken: set[str] = set()
        for src in sources:
            gw, cmd, env = gateway_target(folder, src, up.url, tokenizer, taken)
            gw.proc = pinned(args.gateway_cpu, cmd, src, env, gw.log)
            procs.gateways.append(gw)
        wait_ready(up, "/health")
        for gw in procs.gateways:
            wait_ready(gw, "/readyz")
        yield procs


def stop_all(procs: Processes) -> None:
    for target in procs.targets:
        if target.proc is not None and target.proc.poll() is None:
            target.proc.terminate()
    for target in procs.targets:
        if target.proc is None:
            continue
        try:
            target.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            target.proc.kill()
            target.proc.wait()
