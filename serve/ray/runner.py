"""The child `up` starts for a Ray Serve model: deploy it, report ready, remove it on SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from serve.config.model_file import load_model_file
from serve.engine.process import die_with_parent, parent_ids
from serve.logs import setup_logging
from serve.ray.serve_config import serving_args

log = logging.getLogger("serve.ray.runner")

PR_SET_CHILD_SUBREAPER = 36


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.ray.runner")
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--address", help="a running cluster; without it a local one is started on loopback")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local cluster")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds the driver has to clean up")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def become_subreaper() -> None:
    """Orphans below us (Ray workers and their vLLM engines outliving their raylet) become our children."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def children() -> list[int]:
    me = os.getpid()
    return [pid for pid, parent in parent_ids().items() if parent == me]


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def reap_leftovers(grace: float = 5.0) -> None:
    """TERM, then KILL, whatever Ray left behind (its workers run in process groups of their own)."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while pids := children():
        log.warning("stopping what Ray left behind: %s", ", ".join(f"{pid} {command(pid)}" for pid in pids))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.5)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL


def supervise(argv: list[str], stop_timeout: float) -> int:
    """Run the Ray driver in a session of its own and pass it our SIGTERM.

    `up` stops a child by signalling its process group. Ray's GCS and raylet would be in that group and die at
    once, before the driver could stop the replicas (and their vLLM engines) through them.
    """
    become_subreaper()
    driver = subprocess.Popen(
        [sys.executable, "-m", "serve.ray.runner", "--driver", *argv],
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    stopping = threading.Event()

    def forward(*_: object) -> None:
        stopping.set()
        driver.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while driver.poll() is None and not stopping.wait(1.0):
        pass
    try:
        code = driver.wait(timeout=stop_timeout)
    except subprocess.TimeoutExpired:
        log.warning("the Ray driver did not stop within %.0fs: killing its processes", stop_timeout)
        os.killpg(driver.pid, signal.SIGKILL)
        code = driver.wait()
    reap_leftovers()
    return code


def run_driver(args: argparse.Namespace) -> int:
    model = load_model_file(args.model_file)
    config = serving_args(model, args.weights)

    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    local = args.address is None
    if local:
        # address="local" always starts a new cluster; without it ray.init joins any cluster this host recorded.
        # No dashboard: it carries the job API, which runs any code it is sent.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=args.address, log_to_driver=False)
    stop = threading.Event()
    try:
        # Loopback only: the ingress does not check the gateway's engine key.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_openai_app(config), name=model.name, route_prefix="/", blocking=False)
        # Handlers after Ray's own (ray.init installs one for SIGTERM that exits at once).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        args.ready_file.parent.mkdir(parents=True, exist_ok=True)
        args.ready_file.write_text(f"http://127.0.0.1:{args.port}\n")
        log.info("%s runs on Ray Serve at http://127.0.0.1:%d", model.name, args.port)
        while not stop.wait(1.0):
            pass
    finally:
        args.ready_file.unlink(missing_ok=True)
        started = time.monotonic()
        if local:
            # Stops the replicas while the cluster is still there; their vLLM engine processes may outlive them
            # (the supervisor stops those).
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:
            # Someone else's cluster: remove this application and leave the rest running.
            serve.delete(model.name)
        ray.shutdown()
        log.info("Ray Serve stopped in %.1fs", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging("info")
    if args.driver:
        return run_driver(args)
    return supervise(argv, args.stop_timeout)


if __name__ == "__main__":
    raise SystemExit(main())
