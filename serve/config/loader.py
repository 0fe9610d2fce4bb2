"""Loading YAML files into pydantic models with errors that name the file and the field."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)
Data = dict[str, Any]

EXTENDS = "extends"


class ConfigError(Exception):
    """A configuration file is missing, unreadable or invalid; the message names file and field."""


class Strict(BaseModel):
    """Every configuration section: unknown fields are errors, values are not changed after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Origin = Callable[[tuple[Any, ...]], Path]


def format_validation_error(path: Path | str, exc: ValidationError, origin: Origin | None = None) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        where = origin(tuple(err["loc"])) if origin else None
        lines.append(f"  {loc}: {err['msg']}" + (f" (set in {where})" if where and where != path else ""))
    return "\n".join(lines)


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def read_mapping(path: Path, *, empty_ok: bool = False) -> Data:
    data = read_yaml(path)
    if data is None and empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(cls: type[M], path: Path, data: Data, origin: Origin | None = None) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, origin)) from exc


def load_model(cls: type[M], path: Path, *, empty_ok: bool = False) -> M:
    """Parse `path` as YAML and validate it as `cls`."""
    return validate(cls, path, read_mapping(path, empty_ok=empty_ok))


def resolve_path(base: Path, value: str | Path) -> Path:
    """A path written in a file under `base`: `~` is the home folder, a relative path starts at `base`."""
    path = Path(value).expanduser()
    # normpath, not resolve(): `..` is folded but symlinks stay as the user wrote them.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


@dataclass(frozen=True)
class Layer:
    """One file of an `extends:` chain, as written (paths already resolved against its own folder)."""

    path: Path
    data: Data


def read_layers(path: Path, resolve: Callable[[Data, Path], Data]) -> list[Layer]:
    """The file and the files it extends, the file itself first. `resolve` makes its relative paths absolute."""
    layers: list[Layer] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        real = current.resolve()
        if real in seen:
            chain = " -> ".join(str(p) for p in [*seen, real])
            raise ConfigError(f"{path}: {EXTENDS} makes a cycle ({chain})")
        seen.append(real)
        data = resolve(read_mapping(current), current.parent.absolute())
        parent = data.pop(EXTENDS, None)
        layers.append(Layer(current, data))
        if parent is not None and not (isinstance(parent, str) and parent):
            raise ConfigError(f"{current}: {EXTENDS}: expected the name of another file, got {parent!r}")
        current = resolve_path(current.parent, parent) if parent else None
    return layers


def deep_merge(base: Data, override: Data) -> Data:
    """Mappings merge key by key; anything else (lists, scalars, null) in `override` replaces what `base` had."""
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        merged[key] = deep_merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def merge_layers(layers: list[Layer]) -> Data:
    merged: Data = {}
    for layer in reversed(layers):
        merged = deep_merge(merged, layer.data)
    return merged


def written_in(layers: list[Layer], loc: tuple[Any, ...]) -> Path:
    """The file of the chain whose value a field comes from (the first file when no file wrote it)."""
    for layer in layers:
        node: Any = layer.data
        for part in loc:
            found = part in node if isinstance(node, dict) else isinstance(node, list) and part in range(len(node))
            if not found:
                break
            node = node[part]
        else:
            if loc:
                return layer.path
    return layers[0].path


def load_layered(cls: type[M], path: Path, resolve: Callable[[Data, Path], Data]) -> M:
    """Parse `path`, following `extends:` (relative to each file's folder), and validate the merged mapping."""
    layers = read_layers(path, resolve)
    return validate(cls, path, merge_layers(layers), lambda loc: written_in(layers, loc))
