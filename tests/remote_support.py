"""Helpers for the remote-instrument tests: a TCP relay that can cut a connection mid-message."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class CuttingRelay:
    """Forwards TCP connections from its own loopback port to ``target_port``.

    :meth:`cut_after` arms a one-shot cut: once ``n`` more bytes have gone from the server to a
    client, the relay forwards only up to that byte and closes both sides (a dropped connection
    in the middle of a message). New connections are forwarded normally afterwards.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._cut_at: int | None = None  # server->client bytes (total) at which to cut
        self.server_bytes = 0
        self.cuts = 0
        self.connections = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n_bytes: int) -> None:
        with self._lock:
            self._cut_at = self.server_bytes + n_bytes

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, self._downstream), daemon=True
            ).start()

    def _downstream(self, chunk: bytes) -> tuple[bytes, bool]:
        """What of ``chunk`` (server -> client) to forward, and whether to cut after it."""
        with self._lock:
            start = self.server_bytes
            self.server_bytes += len(chunk)
            if self._cut_at is not None and self.server_bytes >= self._cut_at:
                keep = self._cut_at - start
                self._cut_at = None
                self.cuts += 1
                return chunk[: max(keep, 0)], True
        return chunk, False

    @staticmethod
    def _pump(
        src: socket.socket,
        dst: socket.socket,
        filt: Callable[[bytes], tuple[bytes, bool]] | None,
    ) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                cut = False
                if filt is not None:
                    chunk, cut = filt(chunk)
                if chunk:
                    dst.sendall(chunk)
                if cut:
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes (for effects in server threads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()
