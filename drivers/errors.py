"""The one exception tree of scopepilot.

Every error a user can see derives from :class:`ScopePilotError`. Messages name the offending
value, what was expected and what to do about it.
"""

from __future__ import annotations


class ScopePilotError(Exception):
    """Root of all scopepilot errors."""


class InstrumentError(ScopePilotError):
    """Something went wrong talking to, or acting on, an instrument."""


class NotConnected(InstrumentError):  # noqa: N818 (name fixed by STYLE.md)
    """The instrument is closed or was never connected."""


class CommunicationError(InstrumentError):
    """A transport failed mid-operation (dropped connection, timeout, garbled reply)."""


class LimitViolation(InstrumentError):  # noqa: N818 (name fixed by STYLE.md)
    """A command falls outside the safety envelope.

    Carries the offending ``value``, the ``limit`` it broke and the ``command_id`` so that the
    rejection can be recorded and shown to the operator.
    """

    def __init__(
        self,
        message: str,
        *,
        value: object = None,
        limit: object = None,
        command_id: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.value = value
        self.limit = limit
        self.command_id = command_id
        self.field = field


class CommandRejected(InstrumentError):  # noqa: N818 (name fixed by STYLE.md)
    """The instrument cannot execute this command (unsupported, wrong state, unknown type)."""


class ModelError(ScopePilotError):
    """A perception model could not be loaded or run (corrupt weights, wrong input)."""


class ConfigError(ScopePilotError):
    """A configuration value, option or file is invalid."""


class DataError(ScopePilotError):
    """Bad data: a malformed frame, message, file or session store."""
