"""Route templates: exact paths found by one dict lookup, paths with `{name}` segments matched after them."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")


def matches(template: tuple[str, ...], parts: list[str]) -> bool:
    if len(template) != len(parts):
        return False
    return all(t == p or (t.startswith("{") and bool(p)) for t, p in zip(template, parts, strict=True))


class RouteTable(dict[str, V]):
    """Path -> value, where a key may hold `{name}` segments that match any one non-empty segment.

    Exact keys win; the template a path matched is the key, so metrics label it with the template, never the raw
    path (which would carry ids).
    """

    def __init__(self, routes: dict[str, V]) -> None:
        super().__init__(routes)
        self._templates = [(tuple(key.split("/")), key) for key in routes if "{" in key]

    def template_of(self, path: str) -> str | None:
        if dict.__contains__(self, path) and "{" not in path:
            return path
        parts = path.split("/")
        for template, key in self._templates:
            if matches(template, parts):
                return key
        return None

    def get(self, path: str, default: V | None = None) -> V | None:  # type: ignore[override]
        key = self.template_of(path)
        return dict.__getitem__(self, key) if key is not None else default


def segment(path: str, index: int) -> str:
    """One segment of a path ("/v1/responses/ID" -> index 3 is ID)."""
    return path.split("/")[index]
