"""Overlays as pytest parameters."""

from __future__ import annotations

import pytest

from tests.k8s.rendering import OVERLAYS, Obj, rendered


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objs(overlay: str) -> list[Obj]:
    return rendered(overlay)
