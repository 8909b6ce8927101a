"""Remote instruments over Pyro5: :class:`InstrumentServer` serves any instrument,
:class:`RemoteInstrument` (``pyro:HOST:PORT``) drives it. Frames travel as raw bytes."""

from drivers.remote.client import RemoteInstrument, open_remote, read_token
from drivers.remote.server import InstrumentServer

__all__ = ["InstrumentServer", "RemoteInstrument", "open_remote", "read_token"]
