"""`llmserve bench run --tenants FILE`: every tenant's Locust process at once, measured over one shared window."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from loadtests.config import LoadConfig, QualityConfig, flag, from_args
from loadtests.progress import GroupProgress, LiveProgress
from loadtests.runner import (
    Launched,
    LevelResult,
    Setup,
    Target,
    collect,
    launch,
    machine_busy,
    measurement_window,
    read_records,
)
from loadtests.stats import Window
from loadtests.tenants import Tenant, resolve_tenants
from serve.config.loader import ConfigError

if TYPE_CHECKING:
    from serve.config.model_file import ModelFile

# Run-wide options a tenants run cannot take: each tenant has its own load shape, and all share one window by time.
NOT_WITH_TENANTS = ("users", "rates", "num_requests", "max_requests")


def check(tenants: Sequence[Tenant], base: LoadConfig) -> list[str]:
    """What makes this tenants run meaningless, before anything is started (empty: nothing)."""
    default = LoadConfig()
    problems = [
        f"{flag(name)}: each tenant of a tenants file has its own load; the run has one measured window of --duration"
        for name in NOT_WITH_TENANTS
        if getattr(base, name) != getattr(default, name)
    ]
    for t in tenants:
        ramp = t.config.ramp
        if ramp is not None and ramp > t.config.warmup:
            problems.append(
                f"tenant {t.name}: its users join over {ramp:g} s, longer than the {t.config.warmup:g} s warm-up; "
                "the measured window would start before they are all there (raise --warmup)"
            )
    return problems


def shared_window(launched: Sequence[Launched]) -> Window:
    """Where every tenant's own window overlaps: from the last end of a warm-up to the first stop, so each tenant's
    numbers, and their sum, cover the same seconds."""
    windows = []
    for one in launched:
        records, markers = read_records(one.records)
        windows.append(measurement_window(records, markers, one.setup.config.warmup))
    t0 = max(w.t0 for w in windows)
    return Window(t0, max(t0, min(w.t1 for w in windows)))


def wait_all(launched: Sequence[Launched], progress: GroupProgress) -> list[int]:
    """Every process's exit code, showing progress meanwhile; one past its budget is killed."""
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(launched):
            for i, one in enumerate(launched):
                if i in codes:
                    continue
                code = one.proc.poll()
                budget = one.budget
                if code is None and budget is not None and time.monotonic() - one.started > budget:
                    one.proc.kill()
                    code = one.proc.wait()
                if code is not None:
                    codes[i] = code
                    one.ended = time.monotonic()
            progress.update()
            if len(codes) < len(launched):
                time.sleep(0.5)
    finally:
        progress.close()
    return [codes[i] for i in range(len(launched))]


def run_together(
    targets: Sequence[Target], setups: Sequence[Setup], tenants: Sequence[Tenant], folder: Path, out: TextIO
) -> list[LevelResult]:
    busy = machine_busy()
    launched = [launch(t, tenant.level, s, folder, busy) for t, s, tenant in zip(targets, setups, tenants, strict=True)]
    parts = [LiveProgress(f"{one.target.name}", one.records, one.setup.config, out) for one in launched]
    codes = wait_all(launched, GroupProgress(parts, out))
    window = shared_window(launched)
    return [collect(one, code, window) for one, code in zip(launched, codes, strict=True)]


@dataclass(frozen=True)
class CommandParts:
    """What `bench run` shares with a tenants run, handed over by the command (which imports this module)."""

    default_folder: Callable[..., Any]
    finish: Callable[..., Any]
    measure_quality: Callable[..., Any]
    redacted_command: Callable[..., Any]
    resolve: Callable[..., Any]
    target_of: Callable[..., Any]


def cmd_tenants(args: argparse.Namespace, model: ModelFile, parts: CommandParts) -> int:
    from loadtests.report import Meta, level_line

    default_folder, finish, measure_quality = parts.default_folder, parts.finish, parts.measure_quality
    redacted_command, resolve, target_of = parts.redacted_command, parts.resolve, parts.target_of

    run_target = target_of(args, model)
    base = from_args(LoadConfig, args)
    path = Path(args.tenants)
    try:
        tenants = resolve_tenants(path, base, run_target.key, args.tenant or ())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = check(tenants, base)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    setups = [resolve(t.config, model) for t in tenants]
    targets = [Target(t.name, run_target.url, t.key, run_target.model) for t in tenants]
    quality_config = from_args(QualityConfig, args)
    folder = default_folder(args, "bench")
    meta = Meta(
        title=f"tenants {', '.join(t.name for t in tenants)} of {path.name} on {run_target.url}",
        command=redacted_command(sys.argv[1:]),
        config=base,
        model=run_target.model,
        sampling=resolve(base, model).sampling,
        quality=quality_config,
        tenants=[t.describe() for t in tenants],
    )
    # The quality set is asked once, with the first tenant's key: the answers do not depend on who asks.
    quality = measure_quality(targets[:1], quality_config) if quality_config.quality else []
    names = ", ".join(f"{t.name} ({t.shape()})" for t in tenants)
    print(f"bench: tenants {names} ...", file=sys.stderr, flush=True)
    results = run_together(targets, setups, tenants, folder, sys.stderr)
    for result in results:
        print(level_line(result), file=sys.stderr, flush=True)
    return finish(folder, meta, results, [], quality)
