"""`llmserve bench`: sweep concurrency levels or arrival rates against a target, or compare baseline, vLLM, gateway."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.runner import ROOT, Checks, LevelResult, LoadConfig, Target
from loadtests.scenarios import Lengths, scenario_names

if TYPE_CHECKING:
    from serve.config.model_file import ModelFile

DEFAULT_MODEL_FILE = ROOT / "configs" / "models" / "smollm2-135m-cpu.yaml"
EXIT_FAILED_CRITERIA = 1
EXIT_REFUSED = 3
SECRET_FLAGS = ("--key", "--engine-key")
COMPARE_PAIRS = [("vllm", "baseline"), ("gateway", "baseline"), ("gateway", "vllm")]


def number_list(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> list[int] | list[float]:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
        return values  # type: ignore[return-value]

    return parse


def add_load_options(p: argparse.ArgumentParser, users: str, duration: float) -> None:
    """Options shared by `run` and `compare`: the requests, the load shape, and the pass/fail criteria."""
    g = p.add_argument_group("load")
    g.add_argument("--scenario", default="chat", choices=scenario_names())
    g.add_argument("--seed", type=int, default=0, help="same seed, same requests on every target")
    g.add_argument("--users", type=number_list(int), default=number_list(int)(users), help=f"closed loop ({users})")
    g.add_argument("--rates", type=number_list(float), help="open loop instead: requests/s, e.g. 1,2,4")
    g.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals")
    g.add_argument("--max-in-flight", type=int, default=256, help="open loop: beyond this, requests go out late")
    g.add_argument("--late-tolerance", type=float, default=0.05, help="open loop: seconds before a send is late")
    g.add_argument("--warmup", type=float, default=10.0, help="seconds excluded from the numbers")
    g.add_argument("--duration", type=float, default=duration, help="measured seconds per level")
    g.add_argument("--stop-timeout", type=float, default=90.0, help="seconds for in-flight requests to finish")
    g.add_argument("--max-requests", type=int, help="stop a level after this many requests")
    g.add_argument("--input-len", type=int, help="fixed prompt length (tokens) instead of the scenario's")
    g.add_argument("--output-len", type=int, help="fixed output length (tokens) instead of the scenario's")
    g.add_argument("--max-output-len", type=int, help="clip the scenario's output lengths")
    g.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early (lengths then vary)")
    g.add_argument("--temperature", type=float, help="default: the model file's policy default, else 0.7")
    g.add_argument("--top-p", type=float, help="default: the model file's policy default")
    g.add_argument("--no-cache-salt", action="store_true", help="let runs share vLLM's prefix cache")
    g.add_argument("--out", help="result folder (default results/<kind>-<time>)")
    c = p.add_argument_group("criteria (CI)")
    c.add_argument("--slo-ttft", type=float, default=2.0, help="goodput: TTFT limit in seconds")
    c.add_argument("--slo-tpot", type=float, default=0.2, help="goodput: TPOT limit in seconds")
    c.add_argument("--slo-e2e", type=float, help="goodput: end-to-end limit in seconds")
    c.add_argument("--max-error-rate", type=float, default=0.01, help="exit 1 above this error rate")
    c.add_argument("--max-p99-ttft", type=float, help="exit 1 above this p99 TTFT (seconds)")
    c.add_argument("--min-output-tok-s", type=float, help="exit 1 below this output tokens/s")
    c.add_argument("--max-plausible-tok-s", type=float, help="refuse output tokens/s above this (default: by device)")


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="load tests: tokens/s and latency percentiles, with a report")
    actions = bench.add_subparsers(dest="bench_command", required=True)

    run = actions.add_parser("run", help="sweep concurrency levels (or rates) against one OpenAI-compatible target")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="base URL, without /v1")
    run.add_argument("--key", default=os.environ.get("LLMSERVE_API_KEY"), help="API key (env LLMSERVE_API_KEY)")
    run.add_argument("--key-file", help="read the API key from this file (e.g. .llmserve/dev-key)")
    run.add_argument("--model", help="served model name (default: the model file's name)")
    run.add_argument("--name", default="target", help="the target's name in the report")
    run.add_argument("--model-file", default=str(DEFAULT_MODEL_FILE), help="served name, context length, device")
    add_load_options(run, "1,8,32", 60.0)
    run.set_defaults(func=cmd_run)

    compare = actions.add_parser("compare", help="transformers baseline vs vLLM direct vs the gateway, one run")
    compare.add_argument("--home", default=os.environ.get("LLMSERVE_HOME", ".llmserve"), help="`llmserve up` state")
    compare.add_argument("--engine-key", default=os.environ.get("LLMSERVE_ENGINE_KEY"), help="env LLMSERVE_ENGINE_KEY")
    compare.add_argument("--gateway", help="gateway base URL (default: the stack under --home)")
    compare.add_argument("--engine", help="vLLM engine base URL (default: the stack's first engine)")
    compare.add_argument("--key", default=os.environ.get("LLMSERVE_API_KEY"), help="gateway API key (default: dev-key)")
    compare.add_argument("--model-file", help="the model file (default: the one the stack serves)")
    compare.add_argument("--baseline-url", help="use this running baseline instead of starting one")
    compare.add_argument("--no-baseline", action="store_true", help="only vLLM direct vs the gateway")
    # vLLM's CPU backend runs the model on one core and its API server on the other; the baseline gets the same
    # single core for the model. Two OpenMP threads on a two-core machine that is also running the load generator
    # collapse to a few tokens/s (measured: 2.4 vs 21 tok/s), which would flatter the stack.
    compare.add_argument("--baseline-threads", type=int, default=1, help="torch threads of the baseline (1)")
    add_load_options(compare, "1,8,32,64", 40.0)
    compare.set_defaults(func=cmd_compare)

    scenarios = actions.add_parser("scenarios", help="list the scenarios")
    scenarios.set_defaults(func=cmd_scenarios)

    from loadtests.gateway_bench import add_parser as add_gateway_bench

    add_gateway_bench(actions)


def redacted_command(argv: list[str]) -> str:
    """The command line for the report, keys replaced by ***."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
        elif arg.startswith(SECRET_FLAGS) and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
        hide = arg in SECRET_FLAGS
    return "llmserve " + shlex.join(out)


def sampling(args: argparse.Namespace, model: ModelFile) -> dict[str, Any]:
    """The model's policy defaults, sent explicitly: the gateway would add them, vLLM direct would not, and top_p
    alone changes the engine's work per token (measured: 204 vs 110 output tok/s at 32 users on this CPU)."""
    out: dict[str, Any] = {"temperature": 0.7, **model.policy.defaults}
    if args.temperature is not None:
        out["temperature"] = args.temperature
    if args.top_p is not None:
        out["top_p"] = args.top_p
    return out


def load_config(args: argparse.Namespace, model: ModelFile) -> LoadConfig:
    max_model_len = model.engine.max_model_len
    return LoadConfig(
        scenario=args.scenario,
        seed=args.seed,
        lengths=Lengths(args.input_len, args.output_len, args.max_output_len, max_model_len),
        ignore_eos=not args.no_ignore_eos,
        sampling=sampling(args, model),
        warmup=args.warmup,
        duration=args.duration,
        stop_timeout=args.stop_timeout,
        max_requests=args.max_requests,
        arrival=args.arrival if args.rates else "closed",
        max_in_flight=args.max_in_flight,
        late_tolerance=args.late_tolerance,
        cache_salt=not args.no_cache_salt,
    )


def checks(args: argparse.Namespace, device: str, world_size: int) -> Checks:
    from loadtests.sanity import Thresholds, default_ceiling
    from loadtests.stats import SLO

    return Checks(
        slo=SLO(args.slo_ttft, args.slo_tpot, args.slo_e2e),
        thresholds=Thresholds(args.max_error_rate, args.max_p99_ttft, args.min_output_tok_s),
        ceiling=args.max_plausible_tok_s or default_ceiling(device, world_size),
    )


def sweep(
    targets: list[Target], args: argparse.Namespace, config: LoadConfig, check: Checks, folder: Path
) -> list[LevelResult]:
    from loadtests.runner import Level, run_level

    levels = [Level(rate=r) for r in args.rates] if args.rates else [Level(users=u) for u in args.users]
    results = []
    for level in levels:
        # Targets alternate within a level so that all of them see the same machine at the same time of the run.
        for target in targets:
            print(f"bench: {target.name} at {level.label} ...", file=sys.stderr, flush=True)
            result = run_level(target, level, config, folder, check)
            s = result.summary
            state = "ok" if result.valid else "REFUSED: " + "; ".join(result.problems)
            print(
                f"bench: {target.name} at {level.label}: {s['output_tok_s']:.1f} output tok/s, "
                f"{s['requests']['ok']} ok / {s['requests']['failed']} failed ({state})",
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    return results


def finish(
    folder: Path, meta: dict[str, Any], results: list[LevelResult], pairs: list[tuple[str, str]] | None = None
) -> int:
    from loadtests.report import write

    write(folder, meta, results, pairs or [])
    print((folder / "report.md").read_text())
    print(f"results in {folder}")
    if any(not r.valid for r in results):
        return EXIT_REFUSED
    return EXIT_FAILED_CRITERIA if any(r.failures for r in results) else 0


def default_folder(args: argparse.Namespace, kind: str) -> Path:
    return Path(args.out) if args.out else Path("results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    from serve.config.model_file import load_model_file

    model = load_model_file(args.model_file)
    key = Path(args.key_file).read_text().strip() if args.key_file else args.key
    target = Target(args.name, args.url.rstrip("/").removesuffix("/v1"), key, args.model or model.name)
    config = load_config(args, model)
    folder = default_folder(args, "bench")
    meta = {
        "title": f"{target.name} ({target.url})",
        "command": redacted_command(sys.argv[1:]),
        "config": describe(config, args),
    }
    results = sweep([target], args, config, checks(args, model.engine.device, model.engine.world_size), folder)
    return finish(folder, meta, results)


def cmd_compare(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from loadtests.compare import CompareError, RunningStack, baseline_server, discover, targets
    from serve.config.model_file import load_model_file

    if args.gateway and args.engine and args.key:
        model_file = Path(args.model_file or DEFAULT_MODEL_FILE)
        stack = RunningStack(args.gateway.rstrip("/"), args.key, args.engine.rstrip("/"), model_file)
    else:
        try:
            found = discover(Path(args.home))
        except CompareError as exc:
            print(f"error: {exc} (or give --gateway, --engine and --key)", file=sys.stderr)
            return 2
        stack = RunningStack(
            (args.gateway or found.gateway_url).rstrip("/"),
            args.key or found.gateway_key,
            (args.engine or found.engine_url).rstrip("/"),
            Path(args.model_file) if args.model_file else found.model_file,
        )
    kept = Path(args.home) / "engine-key"  # where `llmserve up` keeps the key when none is given
    if not args.engine_key and kept.is_file():
        args.engine_key = kept.read_text().strip()
    if not args.engine_key:
        print(
            "error: the engine key is needed for vLLM direct: --engine-key, LLMSERVE_ENGINE_KEY or "
            f"{kept} (written by llmserve up)",
            file=sys.stderr,
        )
        return 2
    model = load_model_file(stack.model_file)
    config = load_config(args, model)
    folder = default_folder(args, "compare")
    meta: dict[str, Any] = {
        "title": f"transformers baseline vs vLLM direct vs gateway ({model.name})",
        "command": redacted_command(sys.argv[1:]),
        "config": describe(config, args),
    }
    check = checks(args, model.engine.device, model.engine.world_size)
    if args.no_baseline or args.baseline_url:
        running = nullcontext(args.baseline_url)
    else:
        from serve.models.prepare import prepare_model

        weights = str(prepare_model(model))
        log = folder / "raw" / "baseline.log"
        running = baseline_server(weights, model.name, model.engine.dtype, log, args.baseline_threads)
    try:
        with running as baseline_url:
            meta["baseline"] = {"url": baseline_url, "dtype": model.engine.dtype, "threads": args.baseline_threads}
            chosen = targets(stack, args.engine_key, model.name, baseline_url)
            results = sweep(chosen, args, config, check, folder)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return finish(folder, meta, results, COMPARE_PAIRS)


def describe(config: LoadConfig, args: argparse.Namespace) -> dict[str, Any]:
    from loadtests.runner import describe as describe_config

    data = describe_config(config)
    data["levels"] = {"users": None if args.rates else args.users, "rates": args.rates}
    data["slo"] = {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "e2e_s": args.slo_e2e}
    return data


def cmd_scenarios(args: argparse.Namespace) -> int:
    from loadtests.scenarios import MIXES, SCENARIOS

    for s in SCENARIOS.values():
        print(f"{s.name:22} {s.description}")
    for m in MIXES.values():
        print(f"{m.name:22} {m.description}")
    return 0
