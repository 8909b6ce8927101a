"""Instrument URIs: unknown schemes and malformed URIs fail clearly; new schemes can be added."""

from __future__ import annotations

from typing import Any

import pytest

from drivers import registry
from drivers.errors import ConfigError
from drivers.registry import known_schemes, open_instrument, register_scheme


@pytest.fixture
def isolated_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register schemes without leaking them into other tests."""
    monkeypatch.setattr(registry, "_SCHEMES", dict(registry._SCHEMES))


def test_sim_is_a_known_scheme() -> None:
    assert "sim" in known_schemes()


@pytest.mark.parametrize("uri", ["nosuch:stm", "SIM:stm", "simulated:stm", ":stm", "http://x"])
def test_unknown_scheme_is_a_config_error_listing_known_schemes(uri: str) -> None:
    scheme = uri.split(":", 1)[0]
    with pytest.raises(ConfigError) as info:
        open_instrument(uri)
    message = str(info.value)
    assert repr(scheme) in message and repr(uri) in message
    assert "known schemes: " in message and "sim" in message.split("known schemes: ")[1]


@pytest.mark.parametrize("uri", ["stm", "", "sim-stm", None, 42, b"sim:stm"])
def test_malformed_uri_is_a_config_error_listing_known_schemes(uri: Any) -> None:
    with pytest.raises(ConfigError) as info:
        open_instrument(uri)
    message = str(info.value)
    assert repr(uri) in message
    assert "SCHEME:REST" in message
    assert "sim" in message.split("known schemes: ")[1]


@pytest.mark.usefixtures("isolated_schemes")
def test_register_scheme_routes_uris_to_the_factory() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    sentinel = object()

    def factory(rest: str, **options: Any) -> Any:
        calls.append((rest, options))
        return sentinel

    register_scheme("fake", factory)
    assert "fake" in known_schemes() and "sim" in known_schemes()
    assert open_instrument("fake:host:9090", token="s3cret", timeout_s=2.0) is sentinel
    assert calls == [("host:9090", {"token": "s3cret", "timeout_s": 2.0})]
    with pytest.raises(ConfigError) as info:
        open_instrument("other:x")
    assert "fake" in str(info.value) and "sim" in str(info.value)


@pytest.mark.usefixtures("isolated_schemes")
def test_register_scheme_replaces_an_existing_factory() -> None:
    register_scheme("fake", lambda rest, **options: "first")  # type: ignore[arg-type]
    register_scheme("fake", lambda rest, **options: "second")  # type: ignore[arg-type]
    assert open_instrument("fake:") == "second"
    assert known_schemes().count("fake") == 1


def test_registered_schemes_do_not_leak_between_tests() -> None:
    assert "fake" not in known_schemes()
