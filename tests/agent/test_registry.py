"""The registry's defaults map, which the serving path reads instead of calling get()."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from agent.config import RuntimeConfig
from agent.errors import NotFound, Unavailable
from agent.metrics import Metrics
from agent.runtime.registry import ModelRegistry


def _version(name: str, version: int) -> Any:
    return SimpleNamespace(name=name, version=version)  # add/remove/pin read only these


def _check(registry: ModelRegistry, names: list[str]) -> None:
    """defaults holds exactly what get(name) answers, for every model, loaded or not."""
    for name in names:
        try:
            expected = registry.get(name)
        except (NotFound, Unavailable):
            assert name not in registry.defaults
        else:
            assert registry.defaults[name] is expected


def test_defaults_follow_every_change_of_default() -> None:
    with ThreadPoolExecutor(1) as pool:
        registry = ModelRegistry(RuntimeConfig(), pool, Metrics())
        names = ["a", "b"]
        _check(registry, names)
        registry.add(_version("a", 1))
        _check(registry, names)
        registry.add(_version("a", 2))
        assert registry.defaults["a"].version == 2
        registry.add(_version("a", 3), make_default=False)  # pins 2: the updater switches later
        assert registry.defaults["a"].version == 2
        _check(registry, names)
        registry.pin("a", None)
        assert registry.defaults["a"].version == 3
        registry.pin("a", 1)
        assert registry.defaults["a"].version == 1
        registry.remove("a", 1)  # the pinned version goes: the latest serves
        assert registry.defaults["a"].version == 3
        registry.record_failure("b", 1, "broken")
        _check(registry, names)
        registry.add(_version("b", 2))
        _check(registry, names)
        for v in (2, 3):
            registry.remove("a", v)
        _check(registry, names)
        assert "a" not in registry.defaults
        with pytest.raises(Unavailable):
            registry.get("a")
