"""`llmserve bench gateway`: what the gateway costs per core, direct vs through it, on an instant upstream.

The instant upstream (loadtests/instant_upstream.py) and `llmserve gateway` run as their own processes, pinned with
`taskset`: the gateway alone on one core, the upstream and the load generator (`wrk`) on the other. wrk drives each
target in turn for a short phase (plain, then streamed requests; direct and every gateway alternating), so the
ratios compare targets that saw the same machine minutes apart. The added time to the first token is measured at
low load: one connection per target, requests alternating between them. Every phase records the CPU use of each
process and of each core, to show where the bottleneck was.

    llmserve bench gateway                                         # this checkout's gateway
    llmserve bench gateway --gateway-src ../before --gateway-src .  # two source trees, same run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from loadtests.gateway_bench_client import Exchange, Session, check_exchange, request_bytes
from loadtests.gateway_bench_instructions import instructions_table, run_instructions
from loadtests.gateway_bench_instructions import missing_tools as instructions_tools
from loadtests.gateway_bench_load import Usage, lua_script, profile_wrk, py_spy, run_wrk, top_frames
from loadtests.gateway_bench_procs import MODEL_FILE, ROOT, Processes, Target, started, tree_commit
from loadtests.gateway_bench_report import problems, ratios, table
from loadtests.help import HelpFormatter
from loadtests.instant_upstream import DEFAULT_EVENTS

KINDS = ("plain", "stream")
PROMPT = "What is the capital of France?"
PROFILE_TOP = 25
EXIT_UNUSABLE = 2
EXIT_SUSPECT = 3


def add_parser(actions: Any) -> None:
    """`bench gateway` among the other `llmserve bench` commands."""
    p = actions.add_parser(
        "gateway",
        help="the gateway's cost per core: req/s and latency direct vs through it, on an instant upstream",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_options(p)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway-src",
        action="append",
        type=Path,
        help="a gateway source tree to measure (repeatable, for before/after in one run; default: this checkout)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections in the throughput phases")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per phase")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds of load before each phase")
    p.add_argument("--ttft-requests", type=int, default=400, help="streamed requests per target for the added TTFT")
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="content events per streamed response")
    p.add_argument(
        "--upstream",
        choices=["raw", "starlette"],
        default="raw",
        help="the instant upstream: a raw protocol (as cheap as it gets) or Starlette under uvicorn (a Python server)",
    )
    p.add_argument("--gateway-cpu", type=int, default=0, help="the core the gateway runs on")
    p.add_argument("--load-cpu", type=int, default=1, help="the core the upstream and the load generator run on")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the bundled SmolLM2, prepared if needed)")
    p.add_argument("--out", type=Path, help="JSON report (default results/gateway-bench-<time>.json)")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the measured phases, one more phase per gateway and kind under py-spy; collapsed stacks in DIR",
    )
    p.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="instead of the wrk phases: each gateway under callgrind, instructions per request over N requests "
        "of each kind (immune to the machine's other work; needs valgrind)",
    )
    p.set_defaults(func=cmd_gateway)


def missing_tools(profile: bool) -> str | None:
    if profile and py_spy() is None:
        return "py-spy is not installed: pip install py-spy (into this venv)"
    if shutil.which("wrk") is None:
        return "wrk is not installed: apt-get install wrk (or `make bench-gateway`, which installs it as root)"
    if shutil.which("taskset") is None:
        return "taskset is not installed: apt-get install util-linux"
    return None


def throughput_phase(
    args: argparse.Namespace, procs: Processes, target: Target, kind: str, script: Path
) -> dict[str, Any]:
    print(f"bench gateway: {target.name} {kind} ...", file=sys.stderr, flush=True)
    if args.warmup > 0:
        run_wrk(target.url, script, args.connections, args.warmup, args.load_cpu)
    usage = Usage(procs.pids())
    result = run_wrk(target.url, script, args.connections, args.duration, args.load_cpu)
    cpu = usage.since()
    lat = result["latency_us"]
    seconds = result["duration_us"] / 1e6
    failed = sum(result["errors"].values())
    return {
        "target": target.name,
        "kind": kind,
        "connections": args.connections,
        "seconds": seconds,
        "requests": result["requests"],
        "failed": failed,
        "errors": result["errors"],
        "rps": (result["requests"] - result["errors"]["status"]) / seconds if seconds > 0 else 0.0,
        "latency_ms": {k: lat[k] / 1000.0 for k in ("p50", "p90", "p99", "max", "mean")},
        "cpu": cpu,
    }


def ttft_phase(args: argparse.Namespace, procs: Processes, body: bytes) -> dict[str, Any]:
    """Time to the first content event at one connection per target, requests alternating between targets."""
    print("bench gateway: added time to first token ...", file=sys.stderr, flush=True)
    targets = procs.targets
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    sessions = {t.name: Session(t.url, request_bytes(t.url, body, t.key)) for t in targets}
    try:
        warm = min(50, args.ttft_requests)
        usage = None
        for i in range(warm + args.ttft_requests):
            if i == warm:
                usage = Usage(procs.pids())
            for t in targets:
                exchange = sessions[t.name].exchange()
                check_exchange(t.name, exchange, stream=True, events=args.events)
                if i >= warm and exchange.first_output is not None:
                    samples[t.name].append(exchange.first_output)
    finally:
        for session in sessions.values():
            session.close()
    assert usage is not None
    return {"requests": args.ttft_requests, "samples_s": samples, "cpu": usage.since()}


def validate(procs: Processes, bodies: dict[str, bytes], events: int) -> None:
    """One plain and one streamed request per target, checked in full before any load."""
    for t in procs.targets:
        for kind, body in bodies.items():
            session = Session(t.url, request_bytes(t.url, body, t.key))
            try:
                exchange: Exchange = session.exchange()
            finally:
                session.close()
            check_exchange(t.name, exchange, stream=kind == "stream", events=events)


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
    if stream:
        # Asked for, so the gateway relays the usage event the upstream sends: same events on both paths.
        body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body, separators=(",", ":")).encode()


def served_name(sources: list[Path]) -> str:
    names = {str(yaml.safe_load((src / MODEL_FILE).read_text())["name"]) for src in sources}
    if len(names) != 1:
        raise RuntimeError(f"the source trees serve different model names under {MODEL_FILE}: {sorted(names)}")
    return names.pop()


def run(args: argparse.Namespace, folder: Path, sources: list[Path]) -> dict[str, Any]:
    model = served_name(sources)
    bodies = {kind: request_body(model, kind == "stream") for kind in KINDS}
    with started(args, folder, model, sources) as procs:
        validate(procs, bodies, args.events)
        ttft = ttft_phase(args, procs, bodies["stream"])
        phases = []
        scripts = {
            (t.name, k): lua_script(folder, bodies[k], t.key, f"{t.name}-{k}") for t in procs.targets for k in KINDS
        }
        for kind in KINDS:
            for target in procs.targets:
                phases.append(throughput_phase(args, procs, target, kind, scripts[target.name, kind]))
        profiles = []
        if args.profile:
            profiles = [profile(args, g, k, scripts[g.name, k]) for g in procs.gateways for k in KINDS]
        gateways = [{"name": g.name, "src": str(g.src), "commit": tree_commit(g.src)} for g in procs.gateways if g.src]
    return {"gateways": gateways, "phases": phases, "ttft": ttft, "model": model, "profiles": profiles}


def profile(args: argparse.Namespace, gateway: Target, kind: str, script: Path) -> dict[str, Any]:
    """A phase of its own under py-spy: sampling costs the gateway, so the measured phases stay unprofiled."""
    assert gateway.proc is not None and args.profile is not None
    print(f"bench gateway: {gateway.name} {kind} under py-spy ...", file=sys.stderr, flush=True)
    args.profile.mkdir(parents=True, exist_ok=True)
    out = (args.profile / f"{gateway.name}-{kind}.txt").resolve()
    result = profile_wrk(gateway.proc.pid, out, gateway.url, script, args.connections, args.duration, args.load_cpu)
    return {
        "gateway": gateway.name,
        "kind": kind,
        "file": str(out),
        "rps_under_profiler": result["requests"] / (result["duration_us"] / 1e6),
        **top_frames(out.read_text(), PROFILE_TOP),
    }


def cmd_gateway(args: argparse.Namespace) -> int:
    if args.instructions is not None:
        return cmd_instructions(args)
    missing = missing_tools(args.profile is not None)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_UNUSABLE
    cpus = os.sched_getaffinity(0)
    if args.gateway_cpu == args.load_cpu or not {args.gateway_cpu, args.load_cpu} <= cpus:
        print(f"error: --gateway-cpu and --load-cpu must be two different cores of {sorted(cpus)}", file=sys.stderr)
        return EXIT_UNUSABLE
    if min(args.connections, args.duration, args.ttft_requests, args.events) < 1 or args.warmup < 0:
        print("error: connections, duration, ttft-requests and events must be positive", file=sys.stderr)
        return EXIT_UNUSABLE
    sources = [src.resolve() for src in (args.gateway_src or [ROOT])]
    for src in sources:
        if not (src / "serve" / "cli.py").is_file() or not (src / MODEL_FILE).is_file():
            print(f"error: {src} is not a source tree with serve/cli.py and {MODEL_FILE}", file=sys.stderr)
            return EXIT_UNUSABLE
    out = args.out or Path("results") / f"gateway-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    # The orchestrator (and the TTFT client in it) belongs to the load side: keep it off the gateway's core.
    os.sched_setaffinity(0, {args.load_cpu})
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        try:
            measured = run(args, Path(tmp), sources)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
        finally:
            os.sched_setaffinity(0, cpus)
    report = build_report(args, measured)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"report in {out}")
    return EXIT_SUSPECT if report["problems"] else 0


def cmd_instructions(args: argparse.Namespace) -> int:
    missing = instructions_tools()
    if missing or args.instructions < 1:
        print(f"error: {missing or '--instructions takes a positive count'}", file=sys.stderr)
        return EXIT_UNUSABLE
    sources = [src.resolve() for src in (args.gateway_src or [ROOT])]
    out = args.out or Path("results") / f"gateway-instructions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp:
        try:
            model = served_name(sources)
            bodies = {kind: request_body(model, kind == "stream") for kind in KINDS}
            results = run_instructions(args, Path(tmp), sources, model, bodies)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
    report = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {"requests": args.instructions, "events": args.events, "upstream": args.upstream},
        "gateways": {
            name: {"src": str(src), "commit": tree_commit(src)} for name, src in zip(results, sources, strict=True)
        },
        "instructions": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(instructions_table(results))
    print(f"report in {out}")
    return 0


def build_report(args: argparse.Namespace, measured: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "ttft_requests": args.ttft_requests,
            "events": args.events,
            "gateway_cpu": args.gateway_cpu,
            "load_cpu": args.load_cpu,
            "cpus": os.cpu_count(),
            "load_generator": "wrk -t1 (closed loop)",
        },
        **measured,
    }
    report["ratios"], report["ttft"] = ratios(report)
    report["problems"] = problems(report)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gateway_bench", description=__doc__, formatter_class=HelpFormatter
    )
    add_options(parser)
    args = parser.parse_args()
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
