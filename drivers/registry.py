"""Instrument URIs: ``sim:stm``, and later ``sim:stem``, ``pyro:HOST:PORT``, ``nanonis:HOST:PORT``.

A scheme maps to a factory ``(rest_of_uri, **options) -> Instrument``. Factories import their
implementation lazily, so importing :mod:`drivers` never pulls in simulators or network code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivers.errors import ConfigError
from drivers.protocol import Instrument

Factory = Callable[..., Instrument]

_SCHEMES: dict[str, Factory] = {}


def register_scheme(scheme: str, factory: Factory) -> None:
    """Make ``scheme:...`` URIs open with ``factory(rest, **options)``."""
    _SCHEMES[scheme] = factory


def known_schemes() -> list[str]:
    return sorted(_SCHEMES)


def open_instrument(uri: str, **options: Any) -> Instrument:
    """Open the instrument named by ``uri`` (for example ``sim:stm``).

    Raises :class:`ConfigError` for a malformed URI or an unknown scheme, listing the known ones.
    """
    if not isinstance(uri, str) or ":" not in uri:
        raise ConfigError(
            f"instrument URI {uri!r} is not of the form SCHEME:REST; "
            f"known schemes: {', '.join(known_schemes())} (e.g. sim:stm)"
        )
    scheme, rest = uri.split(":", 1)
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(
            f"unknown instrument scheme {scheme!r} in {uri!r}; "
            f"known schemes: {', '.join(known_schemes())}"
        )
    return factory(rest, **options)


def _open_sim(rest: str, **options: Any) -> Instrument:
    from drivers.sim import open_simulated

    return open_simulated(rest, **options)


def _open_pyro(rest: str, **options: Any) -> Instrument:
    from drivers.remote.client import open_remote

    return open_remote(rest, **options)


def _open_nanonis(rest: str, **options: Any) -> Instrument:
    from drivers.nanonis.driver import open_nanonis

    return open_nanonis(rest, **options)


register_scheme("sim", _open_sim)
register_scheme("pyro", _open_pyro)
register_scheme("nanonis", _open_nanonis)
