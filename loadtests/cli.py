"""`llmserve bench`: sweep load levels against a target, compare baseline / vLLM / gateway, quality, Locust's UI."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.config import DEFAULT_MODEL_FILE, LoadConfig, QualityConfig, add_cli_options, from_args, sampling
from loadtests.runner import LevelResult, Setup, Target
from serve.config.settings import ENGINE_KEY_ENV, env_name

if TYPE_CHECKING:
    from loadtests.quality import QualityResult
    from loadtests.report import Meta
    from serve.config.model_file import ModelFile

EXIT_FAILED_CRITERIA = 1
EXIT_REFUSED = 3
SECRET_FLAGS = ("--key", "--engine-key")
COMPARE_PAIRS = [("vllm", "baseline"), ("gateway", "baseline"), ("gateway", "vllm")]
# Seconds `bench ui` gives Locust to stop after Ctrl-C before it is killed.
UI_STOP_GRACE_S = 20.0
# `compare` runs three targets per level: shorter levels, and the 64 users its criteria are stated at.
COMPARE_DEFAULTS: dict[str, Any] = {"users": (1, 8, 32, 64), "duration": 40.0, "rounds": 2}
# vLLM's CPU backend runs the model on one core and its API server on the other; the baseline gets the same single
# core for the model. Two OpenMP threads on a two-core machine that is also running the load generator collapse to
# a few tokens/s (measured: 2.4 vs 21 tok/s), which would flatter the stack.
BASELINE_THREADS = 1


def add_target_options(p: argparse.ArgumentParser, name: str = "target") -> None:
    g = p.add_argument_group("target")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="base URL, without /v1")
    g.add_argument("--key", default=os.environ.get("LLMSERVE_API_KEY"), help="API key (env LLMSERVE_API_KEY)")
    g.add_argument("--key-file", help="read the API key from this file (e.g. .llmserve/dev-key)")
    g.add_argument("--model", help="served model name (default: the model file's name)")
    g.add_argument("--name", default=name, help="the target's name in the report")
    g.add_argument("--model-file", default=str(DEFAULT_MODEL_FILE), help="served name, context length, sampling")


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="load tests: tokens/s, latency percentiles and quality, with a report")
    actions = bench.add_subparsers(dest="bench_command", required=True)

    run = actions.add_parser("run", help="sweep concurrency levels (or rates) against one OpenAI-compatible target")
    add_target_options(run)
    run.add_argument("--out", help="result folder (default results/bench-<time>)")
    run.add_argument(
        "--tenants",
        metavar="FILE",
        help="several keys at once, each with its own requests and load (YAML; see loadtests/README.md)",
    )
    run.add_argument(
        "--tenant", action="append", metavar="NAME", help="with --tenants: run only this tenant (repeatable)"
    )
    add_cli_options(run, LoadConfig)
    add_cli_options(run, QualityConfig)
    run.set_defaults(func=cmd_run)

    compare = actions.add_parser("compare", help="transformers baseline vs vLLM direct vs the gateway, one run")
    compare.add_argument("--home", help=f"`llmserve up`'s state folder (default: env {env_name('home')} or .llmserve)")
    compare.add_argument("--engine-key", help=f"the engines' key (default: env {ENGINE_KEY_ENV} or the state folder's)")
    compare.add_argument("--gateway", help="gateway base URL (default: the stack under --home)")
    compare.add_argument("--engine", help="vLLM engine base URL (default: the stack's first engine)")
    compare.add_argument("--key", default=os.environ.get("LLMSERVE_API_KEY"), help="gateway API key (default: dev-key)")
    compare.add_argument("--model-file", help="the model file (default: the one the stack serves)")
    add_baseline_options(compare, "use this running baseline instead of starting one")
    compare.add_argument("--no-baseline", action="store_true", help="only vLLM direct vs the gateway")
    compare.add_argument("--out", help="result folder (default results/compare-<time>)")
    add_cli_options(compare, LoadConfig, COMPARE_DEFAULTS)
    add_cli_options(compare, QualityConfig)
    compare.set_defaults(func=cmd_compare)

    quality = actions.add_parser("quality", help="the fixed question set, asked greedily: a score per target")
    add_target_options(quality)
    quality.add_argument("--baseline", action="store_true", help="also score the transformers baseline of the model")
    add_baseline_options(quality, "score this running baseline too")
    quality.add_argument("--out", help="write quality.json (every question, reply and verdict) into this folder")
    add_cli_options(quality, QualityConfig, select=lambda f, o: f.name != "quality")
    quality.set_defaults(func=cmd_quality)

    ui = actions.add_parser("ui", help="Locust's web UI with the same scenarios, target and options")
    add_target_options(ui)
    ui.add_argument("--web-host", default="127.0.0.1", help="where the web UI listens")
    ui.add_argument("--web-port", type=int, default=8089, help="the web UI's port")
    ui.add_argument("--users", dest="initial_users", type=int, default=8, help="the UI's initial number of users")
    add_cli_options(ui, LoadConfig, select=lambda f, o: o.group == "requests" or o.locust or f.name == "stop_timeout")
    ui.set_defaults(func=cmd_ui)

    scenarios = actions.add_parser("scenarios", help="list the scenarios")
    scenarios.set_defaults(func=cmd_scenarios)

    from loadtests.gateway_bench import add_parser as add_gateway_bench

    add_gateway_bench(actions)

    from loadtests.engine_sweep import add_parser as add_engine_sweep

    add_engine_sweep(actions)


def add_baseline_options(p: argparse.ArgumentParser, url_help: str) -> None:
    p.add_argument("--baseline-url", help=url_help)
    p.add_argument(
        "--baseline-threads",
        type=int,
        default=BASELINE_THREADS,
        help=f"torch threads of the baseline ({BASELINE_THREADS})",
    )


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


def resolve(config: LoadConfig, model: ModelFile) -> Setup:
    """The load config against the model file: its sampling defaults, its context window, its hardware's ceiling."""
    from loadtests.sanity import default_ceiling

    return Setup(
        config=config,
        sampling=sampling(config, model.policy.defaults),
        max_model_len=model.engine.max_model_len,
        ceiling=config.max_plausible_tok_s or default_ceiling(model.engine.device, model.engine.world_size),
    )


def target_of(args: argparse.Namespace, model: ModelFile) -> Target:
    key = Path(args.key_file).read_text().strip() if args.key_file else args.key
    return Target(args.name, args.url.rstrip("/").removesuffix("/v1"), key, args.model or model.name)


def measure_quality(targets: list[Target], config: QualityConfig) -> list[QualityResult]:
    from loadtests.quality import ask

    results = []
    for target in targets:
        print(f"bench: quality of {target.name} ...", file=sys.stderr, flush=True)
        result = ask(target, config)
        errors = f", {result.errors} errors" if result.errors else ""
        print(f"bench: quality of {target.name}: {result.score} correct{errors}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def sweep(targets: list[Target], setup: Setup, folder: Path) -> list[LevelResult]:
    from loadtests.report import level_line
    from loadtests.runner import join_rounds, levels, run_level

    results = []
    rounds = setup.config.rounds
    for level in levels(setup.config):
        # Targets alternate within a level so that all of them see the same machine at the same time of the run,
        # and in rounds the order turns (A B C, C B A, ...) so that a drift over the level falls on each alike.
        runs: dict[str, list[LevelResult]] = {t.name: [] for t in targets}
        for round_no in range(1, rounds + 1):
            what = f"round {round_no} of {rounds}" if rounds > 1 else ""
            for target in round_order(targets, round_no):
                where = f"{target.name} at {level.label}" + (f", {what}" if what else "")
                print(f"bench: {where} ...", file=sys.stderr, flush=True)
                result = run_level(target, level, setup, folder, round_no=round_no)
                print(level_line(result, what), file=sys.stderr, flush=True)
                runs[target.name].append(result)
        joined = [join_rounds(runs[t.name], setup) for t in targets]
        if rounds > 1:
            for result in joined:
                print(level_line(result, f"{rounds} rounds joined"), file=sys.stderr, flush=True)
        results += joined
    return results


def round_order(targets: list[Target], round_no: int) -> list[Target]:
    """The targets' order in a round: as given in odd rounds, reversed in even ones."""
    return list(targets) if round_no % 2 else list(reversed(targets))


def finish(
    folder: Path,
    meta: Meta,
    results: list[LevelResult],
    pairs: list[tuple[str, str]] | None = None,
    quality: list[QualityResult] | None = None,
) -> int:
    from loadtests.quality import quality_failures
    from loadtests.report import write

    write(folder, meta, results, pairs or [], quality or [])
    print((folder / "report.md").read_text())
    print(f"results in {folder}")
    if any(not r.valid for r in results):
        return EXIT_REFUSED
    failed = any(r.failures for r in results) or quality_failures(quality or [], meta.quality.quality_tolerance)
    return EXIT_FAILED_CRITERIA if failed else 0


def default_folder(args: argparse.Namespace, kind: str) -> Path:
    return Path(args.out) if args.out else Path("results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    from loadtests.report import Meta
    from serve.config.model_file import load_model_file

    model = load_model_file(args.model_file)
    if args.tenants:
        from loadtests.tenant_run import CommandParts, cmd_tenants

        parts = CommandParts(default_folder, finish, measure_quality, redacted_command, resolve, target_of)
        return cmd_tenants(args, model, parts)
    if args.tenant:
        print("error: --tenant picks tenants of a --tenants file", file=sys.stderr)
        return 2
    target = target_of(args, model)
    setup = resolve(from_args(LoadConfig, args), model)
    c = setup.config
    if c.ramp is not None and c.ramp > c.warmup:
        print(
            f"error: --ramp {c.ramp:g} is longer than --warmup {c.warmup:g}: users would join inside the window",
            file=sys.stderr,
        )
        return 2
    quality_config = from_args(QualityConfig, args)
    folder = default_folder(args, "bench")
    meta = Meta(
        title=f"{target.name} ({target.url})",
        command=redacted_command(sys.argv[1:]),
        config=setup.config,
        model=target.model,
        sampling=setup.sampling,
        quality=quality_config,
    )
    quality = measure_quality([target], quality_config) if quality_config.quality else []
    results = sweep([target], setup, folder)
    return finish(folder, meta, results, [], quality)


def cmd_compare(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from loadtests.compare import CompareError, RunningStack, discover, targets
    from loadtests.report import Baseline, Meta
    from serve.config.model_file import load_model_file
    from serve.config.settings import StateFolder, environment

    env = environment()
    state = StateFolder(Path(args.home)) if args.home else env.state
    if args.gateway and args.engine and args.key:
        model_file = Path(args.model_file or DEFAULT_MODEL_FILE)
        stack = RunningStack(args.gateway.rstrip("/"), args.key, args.engine.rstrip("/"), model_file)
    else:
        try:
            found = discover(state)
        except CompareError as exc:
            print(f"error: {exc} (or give --gateway, --engine and --key)", file=sys.stderr)
            return 2
        stack = RunningStack(
            (args.gateway or found.gateway_url).rstrip("/"),
            args.key or found.gateway_key,
            (args.engine or found.engine_url).rstrip("/"),
            Path(args.model_file) if args.model_file else found.model_file,
        )
    kept = state.engine_key  # where `llmserve up` keeps the key when none is given
    if not args.engine_key and env.engine_key is not None:
        args.engine_key = env.engine_key.get_secret_value()
    if not args.engine_key and kept.is_file():
        args.engine_key = kept.read_text().strip()
    if not args.engine_key:
        print(
            f"error: the engine key is needed for vLLM direct: --engine-key, {ENGINE_KEY_ENV} or "
            f"{kept} (written by llmserve up)",
            file=sys.stderr,
        )
        return 2
    model = load_model_file(stack.model_file)
    setup = resolve(from_args(LoadConfig, args), model)
    quality_config = from_args(QualityConfig, args)
    folder = default_folder(args, "compare")
    meta = Meta(
        title=f"transformers baseline vs vLLM direct vs gateway ({model.name})",
        command=redacted_command(sys.argv[1:]),
        config=setup.config,
        model=model.name,
        sampling=setup.sampling,
        quality=quality_config,
    )
    if args.no_baseline or args.baseline_url:
        running: Any = nullcontext(args.baseline_url)
    else:
        running = start_baseline(model, folder / "raw" / "baseline.log", args.baseline_threads)
    try:
        with running as baseline_url:
            meta.baseline = Baseline(baseline_url, model.engine.dtype, args.baseline_threads)
            metrics_key = env.metrics_key.get_secret_value() if env.metrics_key is not None else None
            chosen = targets(stack, args.engine_key, model.name, baseline_url, metrics_key)
            quality = measure_quality(chosen, quality_config) if quality_config.quality else []
            results = sweep(chosen, setup, folder)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return finish(folder, meta, results, COMPARE_PAIRS, quality)


def start_baseline(model: ModelFile, log: Path, threads: int) -> Any:
    """The transformers baseline of this model file, on a free port, for the duration of a `with` block."""
    from loadtests.compare import baseline_server
    from serve.models.prepare import prepare_model

    return baseline_server(str(prepare_model(model)), model.name, model.engine.dtype, log, threads)


def cmd_quality(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from loadtests.compare import CompareError
    from loadtests.quality import ask, quality_failures, questions, table
    from serve.config.model_file import load_model_file

    model = load_model_file(args.model_file)
    target = target_of(args, model)
    config = from_args(QualityConfig, args)
    chosen = questions()
    folder = Path(args.out) if args.out else None
    print(
        f"quality: {len(chosen)} questions, greedy (temperature 0), up to {config.quality_max_tokens} tokens each",
        file=sys.stderr,
    )
    results = [ask(target, config, chosen)]
    if args.baseline or args.baseline_url:
        log = (folder or Path("results")) / "raw" / "baseline.log"
        running: Any = (
            nullcontext(args.baseline_url) if args.baseline_url else start_baseline(model, log, args.baseline_threads)
        )
        try:
            with running as url:
                results.append(ask(Target("baseline", url, None, target.model), config, chosen))
        except CompareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    failures = quality_failures(results, config.quality_tolerance)
    print(table(results))
    for failure in failures:
        print(f"FAILED {failure}")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {"model": target.model, "tolerance": config.quality_tolerance, "failures": failures}
        data["results"] = {r.target: r.to_json() for r in results}
        (folder / "quality.json").write_text(json.dumps(data, indent=2))
    return EXIT_FAILED_CRITERIA if failures else 0


def cmd_ui(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from loadtests.config import ROOT, LocustRun, locust_argv, locust_env
    from loadtests.runner import LOCUSTFILE
    from serve.config.model_file import load_model_file

    model = load_model_file(args.model_file)
    target = target_of(args, model)
    setup = resolve(from_args(LoadConfig, args), model)
    config = setup.config
    run = LocustRun(
        model=target.model,
        api_key=target.key or "",
        sampling=json.dumps(setup.sampling),
        max_model_len=setup.max_model_len,
        salt=f"ui-{time.time_ns()}" if config.cache_salt else "",
    )
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        target.url,
        "--web-host",
        args.web_host,
        "--web-port",
        str(args.web_port),
        "-u",
        str(args.initial_users),
        "-r",
        str(args.initial_users),
        "--stop-timeout",
        f"{config.stop_timeout:g}",
        *locust_argv(config, run),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(locust_env(run))
    print(f"bench ui: Locust's web UI on http://{args.web_host}:{args.web_port} for {target.url}; Ctrl-C ends it")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached Locust too; `kill -INT` reached only this process: pass it on, and let Locust
        # stop its users before this command ends (never leave it behind, nor unreaped).
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=UI_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    from loadtests.scenarios import MIXES, SCENARIOS

    for s in SCENARIOS.values():
        print(f"{s.name:22} {s.description}")
    for m in MIXES.values():
        print(f"{m.name:22} {m.description}")
    return 0
