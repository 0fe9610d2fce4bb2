"""`llmserve bench sweep`: engine-setting variants of one model file, each started, loaded and scored in turn.

A sweep file names variants, each a mapping of engine settings (the `engine:` fields of a model file) that replace
the base model file's. Every variant becomes a small model file in the result folder that `extends:` the base, and
all of them are validated (the project's loader, then vLLM's own argument parser, as `llmserve config check` does)
before any engine starts. Then, one variant at a time: `llmserve engine` on a free port, `llmserve bench run` at
each user level, `llmserve bench quality`, and the engine stopped (TERM to its process group, KILL after a grace).
sweep.json and sweep.md hold one row per variant, with the load average around it and each level's sample count.

    llmserve bench sweep --sweep loadtests/data/sweep-cpu.yaml --users 1,8,32,64 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loadtests.config import DEFAULT_MODEL_FILE, ROOT
from loadtests.engine_sweep_procs import (
    BENCH_KEY,
    ENGINE_KEY,
    LLMSERVE,
    SweepError,
    engine_argv,
    group,
    run_logged,
    wait_healthy,
)
from loadtests.engine_sweep_report import markdown, variant_row
from loadtests.help import HelpFormatter
from serve.config.loader import ConfigError, read_mapping
from serve.config.model_file import ModelFile, load_model_file

DEFAULT_SWEEP = ROOT / "loadtests" / "data" / "sweep-cpu.yaml"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EXIT_VARIANT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130

EngineCheck = Callable[[ModelFile], None]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    file: Path

    @property
    def folder(self) -> Path:
        return self.file.parent


def add_parser(actions: Any) -> None:
    """`bench sweep` among the other `llmserve bench` commands."""
    p = actions.add_parser(
        "sweep",
        help="engine-setting variants of a model file: each started, loaded and scored, one table",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--base", type=Path, default=DEFAULT_MODEL_FILE, help="the model file every variant extends")
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help="the variants (YAML, `variants:` name -> engine)")
    p.add_argument("--variant", action="append", help="run only this variant (repeatable; default: all)")
    p.add_argument("--users", type=user_levels, default="1,8,32,64", help="user levels of each `bench run`")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds excluded at the start of each level")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per level")
    p.add_argument("--bench-args", default="", help="more `bench run` flags, as one shell-quoted string")
    p.add_argument("--port", type=int, help="the engines' port (default: a free one per variant)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds an engine may take to be healthy")
    p.add_argument("--stop-grace", type=float, default=30.0, help="seconds between TERM and KILL when stopping")
    p.add_argument("--out", type=Path, help="result folder (default results/sweep-<time>)")
    p.add_argument("--dry-run", action="store_true", help="write and validate the variant files, start nothing")
    p.set_defaults(func=cmd_sweep)


def user_levels(text: str) -> str:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected user counts like 1,8,32, got {text!r}")
    return ",".join(map(str, levels))


def read_sweep(path: Path) -> dict[str, dict[str, Any]]:
    """The variants of a sweep file, in its order; errors name the file and the variant."""
    data = read_mapping(path)
    extra = sorted(set(data) - {"variants"})
    if extra:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(map(str, extra))}: a sweep file holds `variants`")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: variants: expected a mapping of variant names to engine settings")
    for name, overrides in variants.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{path}: variants.{name}: a name is letters, digits, '.', '_' and '-' (up to 64)")
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variants.{name}: expected engine settings, got {type(overrides).__name__}")
    return variants


def write_variant(folder: Path, base: Path, name: str, overrides: dict[str, Any]) -> Variant:
    """`folder/NAME/model.yaml`: the base file (by absolute path) with these engine settings over its own."""
    file = folder / name / "model.yaml"
    file.parent.mkdir(parents=True, exist_ok=True)
    head = f"# `llmserve bench sweep` variant {name}: {base.name} with these engine settings over its own.\n"
    body = {"extends": str(base.absolute()), "engine": overrides}
    file.write_text(head + yaml.safe_dump(body, sort_keys=False))
    return Variant(name, overrides, file)


def prepare_variants(
    folder: Path, base: Path, sweep: Path, only: list[str] | None, check_engine: EngineCheck | None
) -> list[Variant]:
    """Write every chosen variant's model file and validate them all; the first error stops the sweep."""
    chosen = read_sweep(sweep)
    unknown = [name for name in only or [] if name not in chosen]
    if unknown:
        raise ConfigError(f"{sweep}: no variant named {', '.join(unknown)} (it has {', '.join(chosen)})")
    variants = [write_variant(folder, base, n, o) for n, o in chosen.items() if not only or n in only]
    models = []
    for variant in variants:
        try:
            model = load_model_file(variant.file)
            if model.ray is not None and model.ray.serve is not None:
                raise ConfigError(f"{variant.file}: runs on Ray Serve: `llmserve engine` cannot start it")
        except ConfigError as exc:
            raise ConfigError(f"variant {variant.name} of {sweep}: {exc}") from exc
        models.append(model)
    # vLLM's parser only once every file has loaded: importing vLLM takes seconds, a typo should not wait for it.
    if check_engine is not None:
        from serve.engine.validate import EngineArgsError

        for variant, model in zip(variants, models, strict=True):
            try:
                check_engine(model)
            except EngineArgsError as exc:
                raise ConfigError(f"variant {variant.name} of {sweep}: {variant.file}: vLLM refused: {exc}") from exc
    return variants


def bench_commands(args: argparse.Namespace, variant: Variant, url: str) -> tuple[list[str], list[str]]:
    """`bench run` and `bench quality` against the variant's engine (the key travels in the environment)."""
    target = ["--url", url, "--model-file", str(variant.file), "--name", variant.name]
    run = [*LLMSERVE, "bench", "run", *target, "--out", str(variant.folder / "bench"), "--users", args.users]
    run += ["--output-len", str(args.output_len), "--ignore-eos", "--temperature", "0"]
    run += ["--warmup", f"{args.warmup:g}", "--duration", f"{args.duration:g}", "--no-quality"]
    run += shlex.split(args.bench_args)
    quality = [*LLMSERVE, "bench", "quality", *target, "--out", str(variant.folder / "quality")]
    return run, quality


def run_variant(args: argparse.Namespace, variant: Variant, key: str) -> dict[str, Any]:
    """Start, load, score and stop one variant; what happened, for its row."""
    from serve.engine.process import free_port

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    start = engine_argv(variant.file, port)
    run, quality = bench_commands(args, variant, url)
    info: dict[str, Any] = {"name": variant.name, "overrides": variant.overrides, "model_file": str(variant.file)}
    info["commands"] = [shlex.join(argv) for argv in (start, run, quality)]
    info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info["load_start"] = list(os.getloadavg())
    log = variant.folder / "engine.log"
    print(f"sweep: {variant.name}: starting the engine on port {port} ...", file=sys.stderr, flush=True)
    try:
        with group(start, {ENGINE_KEY: key}, log, args.stop_grace) as engine:
            info["startup_s"] = round(wait_healthy(engine, url, args.startup_timeout, log), 1)
            print(f"sweep: {variant.name}: healthy after {info['startup_s']:g} s", file=sys.stderr, flush=True)
            info["bench_exit"] = run_logged(run, variant.folder / "bench.log", {BENCH_KEY: key})
            print(f"sweep: {variant.name}: bench run exited with {info['bench_exit']}", file=sys.stderr, flush=True)
            info["quality_exit"] = run_logged(quality, variant.folder / "quality.log", {BENCH_KEY: key})
    except SweepError as exc:
        info["error"] = str(exc)
        print(f"sweep: {variant.name}: {exc}", file=sys.stderr, flush=True)
    info["load_end"] = list(os.getloadavg())
    return info


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from serve.engine.validate import check_engine_args

    folder = (args.out or Path("results") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    try:
        variants = prepare_variants(folder, args.base, args.sweep, args.variant, check_engine_args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"sweep: {len(variants)} variants valid, results in {folder}", file=sys.stderr, flush=True)
    if args.dry_run:
        for variant in variants:
            print(f"{variant.name}: {variant.file}")
        return 0
    # A TERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the engine of the variant running is stopped too.
    signal.signal(signal.SIGTERM, raise_interrupt)
    key = secrets.token_urlsafe(24)
    sweep: dict[str, Any] = {
        "command": "llmserve " + shlex.join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base": str(args.base.absolute()),
        "sweep_file": str(args.sweep.absolute()),
        "users": [int(u) for u in args.users.split(",")],
        "output_len": args.output_len,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "cpus": os.cpu_count(),
        "variants": [],
    }
    try:
        for variant in variants:
            info = run_variant(args, variant, key)
            sweep["variants"].append(variant_row(info, variant.folder / "bench", variant.folder / "quality"))
            (folder / "sweep.json").write_text(json.dumps(sweep, indent=2))
            (folder / "sweep.md").write_text(markdown(sweep))
    except KeyboardInterrupt:
        done = len(sweep["variants"])
        print(f"sweep: interrupted, engine stopped; {done} variants done, in {folder}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print((folder / "sweep.md").read_text())
    print(f"results in {folder}")
    failed = [v["name"] for v in sweep["variants"] if v.get("error") or v.get("bench_exit") or v.get("quality_exit")]
    return EXIT_VARIANT_FAILED if failed else 0
