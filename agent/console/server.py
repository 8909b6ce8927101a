"""Serve the web console with uvicorn in a background thread, beside a running agent.

    with ConsoleServer(controller, host="127.0.0.1", port=8765, token=None) as server:
        print(server.url)          # http://127.0.0.1:8765/
        agent.run()

A console bound to anything but loopback refuses to start without a token: the console can
move a tip and retract a microscope, so the network must not reach it unauthenticated.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import uvicorn

from agent.console.app import create_app
from agent.control import Controller
from drivers.errors import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_or_create_token(path: str | os.PathLike[str], *, create: bool = True) -> str:
    """The token in file ``path``; a missing file is created (mode 0600) with a random token
    when ``create`` is true. An empty file or one with blanks inside raises :class:`ConfigError`.
    """
    file = Path(path)
    if not file.exists():
        if not create:
            raise ConfigError(f"token file {str(file)!r} does not exist")
        token = secrets.token_urlsafe(24)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(token + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot create token file {str(file)!r}: {exc.strerror}") from None
        return token
    try:
        token = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {str(file)!r}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(
            f"token file {str(file)!r} must hold one token without blanks; it holds {token!r:.20}"
        )
    return token


class ConsoleServer:
    """uvicorn serving :func:`~agent.console.app.create_app` in a daemon thread.

    ``port=0`` picks a free port (see :attr:`url` after :meth:`start`). Raises
    :class:`ConfigError` for a non-loopback ``host`` without ``token``.
    """

    def __init__(
        self,
        controller: Controller,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        max_fps: float = 15.0,
    ) -> None:
        if token is None and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve the console on {host!r} without a token: anyone who can "
                f"reach it could steer the microscope; pass --console-token-file or bind to "
                f"127.0.0.1"
            )
        if token is not None and not token:
            raise ConfigError("the console token is empty")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {port!r}")
        self.host, self.port, self.token = host, port, token
        self.app = create_app(controller, token=token, max_fps=max_fps)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address, with the token when there is one."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"http://{host}:{self.port}/"
        return base + (f"?token={quote(self.token)}" if self.token else "")

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ConsoleServer:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            # Frames are raw pixels: deflating 256 kB per frame costs the agent's CPU more
            # than it saves on loopback or a lab network.
            ws_per_message_deflate=False,
            access_log=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="console", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise ConfigError(
                    f"the console could not start on {self.host}:{self.port} (port in use?)"
                )
            if time.monotonic() > deadline:
                server.should_exit = True
                raise ConfigError(f"the console did not start within {timeout_s} s")
            time.sleep(0.01)
        sockets = [s for srv in server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._server, self._thread = server, thread
        log.info("console serving on %s", self.base_url)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server = self._thread = None

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
