"""Tenants files: several keys in one `llmserve bench run`, each with its own requests, load shape and criteria.

A tenant is a name, where its key comes from (a key file or an environment variable: a plain key never goes in the
file), one load shape (closed loop: `users`; open loop: `rate` requests/s) and any of the load options marked
`tenant` in loadtests/config.py, under their own names. What a tenant does not set is the run's (its flags, else
the option's one default).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from loadtests.config import LoadConfig, options, report_lines
from loadtests.runner import Level
from serve.config.loader import ConfigError, Strict, read_mapping, resolve_path

# Fields a plain key would be written under: named so the error says what to do instead.
PLAIN_KEY_FIELDS = ("key", "api_key", "apikey", "token")
# The options a tenant's load shape replaces: a tenants run has one level, each tenant its own shape.
SHAPE_FIELDS = ("users", "rates")


@cache
def tenant_options() -> type[BaseModel]:
    """The `tenant` options of LoadConfig as a pydantic model: each unset unless the file sets it, typed as the
    option is (choices as literals), so a wrong value is named by its field."""
    hints = typing.get_type_hints(LoadConfig)
    fields: dict[str, Any] = {}
    for f, o in options(LoadConfig):
        if not o.tenant:
            continue
        hint = hints[f.name]
        if o.choices:
            hint = Literal[o.choices]
        if o.limits is not None:
            base = typing.get_args(hint)[0] if typing.get_origin(hint) in (types.UnionType, typing.Union) else hint
            hint = Annotated[base, Field(**o.limits.field)] | None
        fields[f.name] = (hint, Field(default=None, description=o.help))
    model: type[BaseModel] = create_model("TenantOptions", __base__=Strict, **fields)
    return model


class TenantSpec(tenant_options()):  # type: ignore[misc]
    """One tenant as written in the file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    description: str = ""
    key_file: Path | None = None
    key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    users: int | None = Field(default=None, gt=0)
    rate: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_plain_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in PLAIN_KEY_FIELDS:
                if name in data:
                    raise ValueError(
                        f"{name}: a plain key never goes in a tenants file; name a key_file or a key_env variable"
                    )
        return data

    @model_validator(mode="after")
    def _one_shape_one_key(self) -> TenantSpec:
        if (self.users is None) == (self.rate is None):
            raise ValueError("give exactly one load shape: users (closed loop) or rate (open loop, requests/s)")
        if self.key_file is not None and self.key_env is not None:
            raise ValueError("give at most one of key_file and key_env")
        set_here = self.model_fields_set
        if self.rate is not None and "ramp" in set_here:
            raise ValueError("ramp is for closed-loop users; an open-loop tenant's requests arrive at its rate")
        if self.users is not None and set_here & {"arrival", "max_in_flight"}:
            raise ValueError("arrival and max_in_flight are for an open-loop tenant (rate)")
        return self


class TenantsFile(Strict):
    """A tenants file: `tenants`, a list of at least one tenant with distinct names."""

    tenants: list[TenantSpec] = Field(min_length=1)

    @field_validator("tenants")
    @classmethod
    def _distinct(cls, tenants: list[Any]) -> list[Any]:
        names = [t.name for t in tenants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tenant names must differ: {', '.join(twice)} more than once")
        return tenants


@dataclass(frozen=True)
class Tenant:
    """A tenant ready to run: its key (never shown), where the key came from, its level and its whole config."""

    name: str
    description: str
    key: str | None
    key_source: str
    level: Level
    config: LoadConfig
    overrides: tuple[str, ...]  # the options the file set for it

    def describe(self) -> dict[str, Any]:
        """What the report says about this tenant: everything but the key."""
        return {
            "name": self.name,
            "description": self.description,
            "key": self.key_source,
            "users": self.level.users,
            "rate": self.level.rate,
            "options": {name: getattr(self.config, name) for name in self.overrides},
        }

    def shape(self) -> str:
        if self.level.users is not None:
            return f"{self.level.users} users"
        return f"{self.level.rate:g} req/s {self.config.arrival}"

    def settings(self) -> list[str]:
        """The report's lines for the options this tenant set (the run's own are listed once, for all)."""
        own = dataclasses.replace(LoadConfig(), **{n: getattr(self.config, n) for n in self.overrides})
        default = set(report_lines(LoadConfig()))
        lines = [line for line in report_lines(own) if line not in default]
        lines += [f"{n} {getattr(self.config, n)}" for n in self.overrides if not _labelled(n)]
        return lines


def _labelled(name: str) -> bool:
    return next(o for f, o in options(LoadConfig) if f.name == name).label is not None


def _where(data: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    """A field's place in the file, the tenant named: `tenants[1] (quiet).rate`."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "tenants" and isinstance(loc[1], int):
        listed = data.get("tenants")
        entry = listed[loc[1]] if isinstance(listed, list) and loc[1] < len(listed) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        head = f"tenants[{loc[1]}]" + (f" ({name})" if isinstance(name, str) else "")
        parts = [head, *parts[2:]]
    return ".".join(parts) or "(top level)"


def load_tenants(path: Path) -> TenantsFile:
    """Parse and validate a tenants file; errors name the file and the field."""
    data = read_mapping(path)
    try:
        return TenantsFile.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid tenants file"]
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_where(data, tuple(err['loc']))}: {msg}")
        raise ConfigError("\n".join(lines)) from exc


def resolve_tenants(
    path: Path,
    base: LoadConfig,
    default_key: str | None,
    only: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[Tenant]:
    """The file's tenants (those named in `only`, when given) against the run's config, their keys read."""
    parsed = load_tenants(path)
    env = os.environ if environ is None else environ
    specs: list[Any] = list(parsed.tenants)
    unknown = sorted(set(only) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"{path}: no tenant named {', '.join(unknown)} (the file has {_names(specs)})")
    chosen = [s for s in specs if not only or s.name in only]
    out = []
    for index, spec in enumerate(specs):
        if spec not in chosen:
            continue
        where = f"{path}: tenants[{index}] ({spec.name})"
        key, source = _key(spec, path, where, env, default_key)
        overrides = tuple(n for n in tenant_options().model_fields if n in spec.model_fields_set)
        config = dataclasses.replace(
            base,
            **{n: getattr(spec, n) for n in overrides},
            users=(spec.users,) if spec.users is not None else base.users,
            rates=(spec.rate,) if spec.rate is not None else None,
        )
        level = Level(users=spec.users) if spec.users is not None else Level(rate=spec.rate)
        out.append(Tenant(spec.name, spec.description, key, source, level, config, overrides))
    return out


def _names(specs: Sequence[Any]) -> str:
    return ", ".join(s.name for s in specs)


def _key(spec: Any, path: Path, where: str, env: Mapping[str, str], default_key: str | None) -> tuple[str | None, str]:
    if spec.key_env is not None:
        value = env.get(spec.key_env, "").strip()
        if not value:
            raise ConfigError(f"{where}.key_env: the environment variable {spec.key_env} is not set")
        return value, f"environment variable {spec.key_env}"
    if spec.key_file is not None:
        file = resolve_path(path.parent.absolute(), spec.key_file)
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.key_file: cannot read {file}: {exc.strerror}") from exc
        if not value:
            raise ConfigError(f"{where}.key_file: {file} is empty")
        return value, f"key file {file}"
    return default_key, "the run's --key" if default_key else "no key"
