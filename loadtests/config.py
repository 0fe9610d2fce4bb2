"""Load-test options, declared once: `llmserve bench` flags, the Locust process's options and the report's lines.

Each option is a dataclass field whose metadata holds its help, its group and where else it appears: `cli` makes
it a flag of `bench run` / `compare`, `locust` an option of the Locust process (also read from LOADTEST_<NAME>, and
shown in Locust's web UI), `label` a line of the report, `tenant` a field a tenant of a tenants file may set for
itself (loadtests/tenants.py). The default is the field's default and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from loadtests.scenarios import Lengths, scenario_names
from loadtests.shapes import ARRIVALS
from serve.config.settings import DEFAULT_MODEL_FILE as SERVE_DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
# `llmserve up`'s default model file (relative to a source checkout).
DEFAULT_MODEL_FILE = ROOT / SERVE_DEFAULT_MODEL
ENV_PREFIX = "LOADTEST_"
# The sampling sent where neither the command line nor the model file says: the OpenAI API's own default, which the
# gateway (without a policy default), vLLM and the baseline all apply to a request without a temperature.
FALLBACK_SAMPLING: dict[str, Any] = {"temperature": 1.0}
SCENARIO_NAMES = tuple(scenario_names())


@dataclass(frozen=True)
class Opt:
    help: str
    group: str
    cli: bool = True  # a flag of `bench run` and `bench compare`
    locust: bool = False  # an option of the Locust process (and of `bench ui`)
    label: str | None = None  # how the report names it (None: not listed)
    unit: str = ""
    choices: tuple[str, ...] | None = None
    secret: bool = False  # travels in the environment only, never on a command line
    ui: bool = True  # shown in Locust's web UI (when `locust`)
    metavar: str | None = None
    tenant: bool = False  # a tenant of a tenants file may set it for its own requests, load or criteria
    limits: Limits | None = None  # the values allowed, checked alike on the command line and in a tenants file


@dataclass(frozen=True)
class Limits:
    """Bounds of a number option, in pydantic's terms (a tenants file checks them with `Field(**limits.field)`)."""

    ge: float | None = None
    lt: float | None = None

    @property
    def field(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def holds(self, value: float) -> bool:
        return (self.ge is None or value >= self.ge) and (self.lt is None or value < self.lt)

    def describe(self) -> str:
        if self.ge is not None and self.lt is not None:
            return f"from {self.ge:g} up to (not including) {self.lt:g}"
        return f"of at least {self.ge:g}" if self.ge is not None else f"below {self.lt:g}"


def bounded(inner: Callable[[str], Any], limits: Limits) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = inner(text)
        except ValueError:
            value = None
        if value is None or not limits.holds(value):
            raise argparse.ArgumentTypeError(f"a number {limits.describe()}, not {text!r}")
        return value

    return parse


def opt(default: Any, help: str, group: str, **kw: Any) -> Any:
    return field(default=default, metadata={"opt": Opt(help, group, **kw)})


@dataclass(frozen=True)
class LoadConfig:
    """What one `llmserve bench run` or `compare` does at every level, and the criteria it is judged by."""

    # The requests
    scenario: str = opt(
        "chat",
        "requests (see `bench scenarios`)",
        "requests",
        locust=True,
        label="scenario",
        choices=SCENARIO_NAMES,
        tenant=True,
    )
    seed: int = opt(0, "same seed, same requests on every target", "requests", locust=True, label="seed", tenant=True)
    pool_size: int = opt(2000, "distinct requests before the sequence repeats", "requests", cli=False, locust=True)
    input_len: int | None = opt(
        None,
        "fixed prompt length (tokens) instead of the scenario's",
        "requests",
        locust=True,
        label="input length",
        tenant=True,
    )
    output_len: int | None = opt(
        None,
        "fixed output length (tokens) instead of the scenario's",
        "requests",
        locust=True,
        label="output length",
        tenant=True,
    )
    output_spread: float | None = opt(
        None,
        "spread a fixed --output-len uniformly over +-this fraction, the mean kept (0.5: 32-96 for 64); equal "
        "lengths keep closed-loop users in lockstep and make tokens/s depend on where the window falls",
        "requests",
        locust=True,
        label="output spread",
        tenant=True,
        limits=Limits(ge=0, lt=1),
    )
    max_output_len: int | None = opt(
        None, "clip the scenario's output lengths", "requests", locust=True, label="output length at most", tenant=True
    )
    ignore_eos: bool = opt(
        True,
        "exact output lengths (--no-ignore-eos lets the model stop)",
        "requests",
        locust=True,
        label="ignore_eos",
        tenant=True,
    )
    temperature: float | None = opt(None, "default: the model file's policy default", "requests", tenant=True)
    top_p: float | None = opt(None, "default: the model file's policy default", "requests", tenant=True)
    cache_salt: bool = opt(True, "a fresh vLLM prefix-cache salt per run (--no-cache-salt shares it)", "requests")
    # The load
    users: tuple[int, ...] = opt((1, 8, 32), "closed loop: concurrent users per level", "load", metavar="N,N,...")
    rates: tuple[float, ...] | None = opt(
        None, "open loop instead: requests/s per level, e.g. 1,2,4", "load", metavar="R,R,..."
    )
    arrival: str = opt("poisson", "open-loop arrivals", "load", choices=ARRIVALS, locust=True, tenant=True)
    max_in_flight: int = opt(256, "open loop: beyond this, requests go out late", "load", locust=True, tenant=True)
    ramp: float | None = opt(
        None,
        "closed loop: seconds over which the users join (default: half the warm-up); spread over one request's "
        "duration, equal requests stop finishing in waves",
        "load",
        label="users join over",
        unit=" s",
        tenant=True,
    )
    late_tolerance: float = opt(0.05, "open loop: seconds after its due time a send counts as late", "load")
    warmup: float = opt(10.0, "seconds excluded from the numbers", "load", locust=True, label="warm-up", unit=" s")
    duration: float = opt(60.0, "measured seconds per level", "load", label="measured per level", unit=" s")
    rounds: int = opt(
        1,
        "run each level this many times per target, the targets' order reversed every round (A B, B A, ...), and "
        "join the rounds' windows: drift of the machine during a level then falls on every target alike",
        "load",
        label="rounds per level",
        limits=Limits(ge=1),
    )
    num_requests: int | None = opt(
        None,
        "end each level when this many requests sent after the warm-up have finished (instead of --duration)",
        "load",
        locust=True,
        label="requests per level",
    )
    max_requests: int | None = opt(None, "stop a level after this many requests in all", "load", locust=True)
    stop_timeout: float = opt(
        120.0, "seconds for requests in flight to finish after a level", "load", label="stop timeout", unit=" s"
    )
    request_timeout: float = opt(900.0, "seconds before one request is given up", "load", locust=True, tenant=True)
    # The criteria
    slo_ttft: float | None = opt(
        2.0, "goodput: TTFT limit in seconds", "criteria", label="SLO TTFT", unit=" s", tenant=True
    )
    slo_tpot: float | None = opt(
        0.2, "goodput: TPOT limit in seconds", "criteria", label="SLO TPOT", unit=" s", tenant=True
    )
    slo_e2e: float | None = opt(
        None, "goodput: end-to-end limit in seconds", "criteria", label="SLO e2e", unit=" s", tenant=True
    )
    max_error_rate: float | None = opt(0.01, "exit 1 above this error rate", "criteria", tenant=True)
    max_p99_ttft: float | None = opt(None, "exit 1 above this p99 TTFT (seconds)", "criteria", tenant=True)
    min_output_tok_s: float | None = opt(None, "exit 1 below this output tokens/s", "criteria", tenant=True)
    max_plausible_tok_s: float | None = opt(None, "refuse output tokens/s above this (default: by device)", "criteria")

    @property
    def lengths(self) -> Lengths:
        return Lengths(self.input_len, self.output_len, self.max_output_len, output_spread=self.output_spread or 0.0)

    @property
    def open_loop(self) -> bool:
        return self.rates is not None


@dataclass(frozen=True)
class QualityConfig:
    """The quality check: a fixed question set asked greedily through a target."""

    quality: bool = opt(True, "ask the quality questions before the load (--no-quality skips them)", "quality")
    quality_concurrency: int = opt(4, "quality questions in flight at once", "quality")
    quality_max_tokens: int = opt(64, "output tokens allowed per quality answer", "quality")
    quality_tolerance: int = opt(
        2, "fail (exit 1) when a target answers more than this many questions fewer than the baseline", "quality"
    )


@dataclass(frozen=True)
class LocustRun:
    """What one Locust process needs beyond the load config: the target's model, the level, where records go."""

    model: str = opt("", "served model name (default: the default model file's name)", "run", cli=False, locust=True)
    api_key: str = opt("", "Bearer key", "run", cli=False, locust=True, secret=True)
    sampling: str = opt(
        "{}", "sampling parameters sent with every request (JSON object)", "run", cli=False, locust=True
    )
    max_model_len: int | None = opt(
        None, "the model's context window (prompts are fitted into it)", "run", cli=False, locust=True
    )
    rate: float | None = opt(None, "open loop: requests/s (empty: closed loop)", "run", cli=False, locust=True)
    salt: str = opt("", "vLLM prefix-cache salt (empty: none)", "run", cli=False, locust=True)
    records: str = opt("", "JSON lines file, one line per request", "run", cli=False, locust=True, ui=False)
    progress_every: float = opt(
        1.0, "seconds between progress lines in the records file", "run", cli=False, locust=True, ui=False
    )


T = TypeVar("T")


def options(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Opt]]:
    for f in dataclasses.fields(cls):
        yield f, f.metadata["opt"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a yes/no value: {text!r}")


def number_list(kind: type[int] | type[float]) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
        return values

    return parse


def parser_of(cls: type[Any], name: str) -> Callable[[str], Any]:
    """From the text of a flag or an environment variable to the field's value (empty text: None where allowed)."""
    base, nullable = _base(_hints(cls)[name])
    limits = next((o.limits for f, o in options(cls) if f.name == name), None)
    inner: Callable[[str], Any]
    if limits is not None:
        inner = bounded(base, limits)
    elif typing.get_origin(base) is tuple:
        inner = number_list(typing.get_args(base)[0])
    elif base is bool:
        inner = parse_bool
    else:
        inner = base

    def parse(text: str) -> Any:
        if nullable and text.strip().lower() in ("", "none"):
            return None
        return inner(text)

    return parse


def to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_cli_options(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    defaults: dict[str, Any] | None = None,
    select: Callable[[dataclasses.Field[Any], Opt], bool] | None = None,
) -> None:
    """The `cli` fields of `cls` (those `select` keeps) as flags, an argument group per field group. `defaults` are a
    command's own defaults where they differ from the field's."""
    own = defaults or {}
    groups: dict[str, Any] = {}
    for f, o in options(cls):
        if not o.cli or (select is not None and not select(f, o)):
            continue
        group = groups.setdefault(o.group, parser.add_argument_group(o.group))
        default = own.get(f.name, f.default)
        base, _ = _base(_hints(cls)[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": _help(o.help, default)}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = o.help
        else:
            kw.update(type=parser_of(cls, f.name), choices=o.choices, metavar=o.metavar)
        group.add_argument(flag(f.name), **kw)


def _help(text: str, default: Any) -> str:
    return text if default is None else f"{text} ({to_text(default)})"


def from_args(cls: type[T], args: argparse.Namespace, *, locust: bool = False) -> T:
    """An instance from parsed flags (`locust`: Locust's parsed options); the other fields keep their default."""
    values: dict[str, Any] = {}
    for f, o in options(cls):
        if (o.locust if locust else o.cli) and hasattr(args, f.name):
            value = getattr(args, f.name)
            # Locust's web UI hands back text for options whose default is None.
            values[f.name] = parser_of(cls, f.name)(value) if isinstance(value, str) and _parses_text(cls, f) else value
    return cls(**values)


def _parses_text(cls: type[Any], f: dataclasses.Field[Any]) -> bool:
    return _base(_hints(cls)[f.name])[0] is not str


def add_locust_options(parser: Any, classes: Iterable[type[Any]]) -> None:
    """The `locust` fields as options of Locust's parser (configargparse: an environment variable each)."""
    for cls in classes:
        for f, o in options(cls):
            if not o.locust:
                continue
            parser.add_argument(
                flag(f.name),
                dest=f.name,
                env_var=ENV_PREFIX + f.name.upper(),
                type=parser_of(cls, f.name),
                default=f.default,
                choices=list(o.choices) if o.choices else None,
                help=o.help,
                is_secret=o.secret,
                include_in_web_ui=o.ui,
            )


def locust_argv(*instances: Any) -> list[str]:
    """The Locust process's options for these values; secrets stay out (they go in the environment)."""
    argv: list[str] = []
    for instance in instances:
        for f, o in options(type(instance)):
            value = getattr(instance, f.name)
            if o.locust and not o.secret and value is not None:
                argv += [flag(f.name), to_text(value)]
    return argv


def locust_env(*instances: Any) -> dict[str, str]:
    """The secret `locust` fields, as the environment variables Locust reads them from."""
    return {
        ENV_PREFIX + f.name.upper(): to_text(getattr(instance, f.name))
        for instance in instances
        for f, o in options(type(instance))
        if o.locust and o.secret
    }


def report_lines(config: LoadConfig) -> list[str]:
    """`label: value` for every labelled option that is set, in declaration order."""
    out = []
    for f, o in options(LoadConfig):
        value = getattr(config, f.name)
        if o.label is None or value is None:
            continue
        if f.name == "duration" and config.num_requests is not None:
            continue  # a level then ends by count, not by time
        text = ("on" if value else "off") if isinstance(value, bool) else to_text(value)
        out.append(f"{o.label} {text}{o.unit}")
    return out


def sampling(config: LoadConfig, policy_defaults: dict[str, Any]) -> dict[str, Any]:
    """The sampling every target gets, sent explicitly: the gateway would add the model's policy defaults, vLLM
    direct would not, and top_p alone changes the engine's work per token (measured: 204 vs 110 output tok/s at
    32 users on this CPU)."""
    out: dict[str, Any] = {**FALLBACK_SAMPLING, **policy_defaults}
    if config.temperature is not None:
        out["temperature"] = config.temperature
    if config.top_p is not None:
        out["top_p"] = config.top_p
    return out


def parse_sampling(text: str) -> dict[str, Any]:
    data = json.loads(text or "{}")
    if not isinstance(data, dict):
        raise ValueError("sampling must be a JSON object")
    return data


@cache
def default_model_name() -> str:
    from serve.config.model_file import load_model_file

    return load_model_file(DEFAULT_MODEL_FILE).name
