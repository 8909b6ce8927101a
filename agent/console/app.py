"""The web console: a Starlette app over a :class:`~agent.control.Controller`.

Routes (all JSON unless said otherwise; every ``/api`` route and the websocket need the token
when the console has one, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``):

    GET  /                      the console page (static HTML and JavaScript, no build step)
    GET  /api/status            the controller's status snapshot
    POST /api/pause|resume|abort|lock|unlock        body {"operator": NAME, "via": CHANNEL}
    POST /api/mode              body {..., "mode": "autonomous"|"supervised"|"manual"}
    POST /api/approve|veto      body {..., "id": COMMAND_ID[, "reason": TEXT]}
    POST /api/send              body {..., "command": COMMAND_JSON}
    POST /api/thresholds        body {..., "values": {NAME: NUMBER}}
    WS   /ws                    pushes {"type": "status", ...} texts and binary frames

Requests from another site (an ``Origin`` that is not this console) are refused, and so are
POSTs that are not ``application/json``: a web page elsewhere cannot drive the console through
the operator's browser. Without a token, only loopback host names are served (no DNS rebinding).

A refused request answers ``{"error": MESSAGE, "kind": EXCEPTION_NAME}`` with 400 (malformed),
401 (token, foreign origin), 404 (no such pending command) or 409 (control lock held, session
stopped), and is recorded in the session.

Binary frame messages: a 4-byte little-endian header length, a UTF-8 JSON header
``{"seq", "frame_index", "h", "w", "lo", "hi", "view", "tip", "defects", "problems"}``, then
``h*w`` uint8 pixels (row-major, ``lo``..``hi`` mapped to 0..255, NaN as 0). ``view`` is
``"raw"`` for the instrument's frame and ``"sr"`` for the sr stage's recovered image of frame
``seq`` (sent after the frame's perception, when the session runs the sr stage).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from agent.control import AuthError, Controller, ControlLocked, NoSuchCommand, OperatorError
from drivers.errors import ConfigError, DataError, ScopePilotError
from drivers.frame import Frame

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ACTIONS = ("pause", "resume", "abort", "lock", "unlock", "mode", "approve", "veto", "send")
_NAME = re.compile(r"^[\w.@+-]{1,64}$")
_STATUS_INTERVAL_S = 0.25
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def encode_frame(
    seq: int, frame: Frame, perception: dict[str, Any] | None = None, *, view: str = "raw"
) -> bytes:
    """The binary websocket message for ``frame`` (see the module docstring).

    Contrast: the 1st and 99th percentiles of the finite pixels (of a 4x subsample, which is
    plenty for a display stretch) map to 0 and 255.
    """
    data = np.asarray(frame.data, dtype=np.float32)
    finite = data[::4, ::4]
    finite = finite[np.isfinite(finite)]
    if finite.size:
        lo, hi = (float(v) for v in np.percentile(finite, (1.0, 99.0)))
    else:
        lo, hi = 0.0, 1.0
    if not hi > lo:
        hi = lo + 1.0
    scaled = np.subtract(data, lo, dtype=np.float32)
    scaled *= 255.0 / (hi - lo)
    np.clip(scaled, 0.0, 255.0, out=scaled)  # +-inf clip to 255 and 0; NaN stays NaN
    np.nan_to_num(scaled, copy=False, nan=0.0)
    pixels = scaled.astype(np.uint8)
    perception = perception or {}
    header = json.dumps(
        {
            "seq": seq,
            "frame_index": frame.frame_index,
            "h": int(pixels.shape[0]),
            "w": int(pixels.shape[1]),
            "lo": lo,
            "hi": hi,
            "channel": frame.channel,
            "lines_done": frame.lines_done,
            "view": view,
            "tip": perception.get("tip"),
            "defects": perception.get("defects") or [],
            "problems": perception.get("problems") or [],
        },
        allow_nan=False,
    ).encode()
    return struct.pack("<I", len(header)) + header + pixels.tobytes()


def decode_frame(message: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The header and ``(h, w) uint8`` pixels of a message from :func:`encode_frame`."""
    if len(message) < 4:
        raise DataError(f"frame message of {len(message)} bytes is too short")
    (n,) = struct.unpack_from("<I", message)
    header = json.loads(message[4 : 4 + n])
    pixels = np.frombuffer(message, np.uint8, offset=4 + n)
    return header, pixels.reshape(header["h"], header["w"])


def _status_code(exc: ScopePilotError) -> int:
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, NoSuchCommand):
        return 404
    if isinstance(exc, (ControlLocked, OperatorError)):
        return 409
    return 400


def _error(exc: ScopePilotError) -> JSONResponse:
    return JSONResponse(
        {"error": str(exc), "kind": type(exc).__name__}, status_code=_status_code(exc)
    )


def create_app(controller: Controller, *, token: str | None, max_fps: float = 15.0) -> Starlette:
    """The console app for ``controller``; ``token`` None means no token is asked for
    (only allowed on loopback, see :class:`agent.console.server.ConsoleServer`)."""
    if not max_fps > 0:
        raise ConfigError(f"max_fps must be > 0, got {max_fps!r}")

    def token_ok(given: str | None) -> bool:
        if token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def request_token(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.query_params.get("token")

    def foreign(headers: Any) -> str | None:
        """Why a request comes from another site (cross-site request forgery, DNS rebinding),
        or None. Browsers always send ``Origin`` on cross-site POSTs and websockets."""
        origin = headers.get("origin")
        host = headers.get("host", "")
        if origin and urlsplit(origin).netloc != host:
            return f"request from another site (Origin {origin!r}, Host {host!r})"
        if token is None and urlsplit(f"//{host}").hostname not in _LOOPBACK_NAMES:
            return f"Host {host!r} is not a loopback name and the console has no token"
        return None

    async def refuse_foreign(action: str, origin: str, why: str) -> AuthError:
        error = AuthError(f"refused: {why}")
        await run_in_threadpool(controller.refuse, action, origin, error)
        return error

    async def refuse_auth(action: str, origin: str, given: str | None) -> AuthError:
        what = "no access token given" if not given else "wrong access token"
        error = AuthError(f"{what}; use the token from the console's token file")
        await run_in_threadpool(controller.refuse, action, origin, error)
        return error

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def script(request: Request) -> Response:
        return FileResponse(STATIC / "console.js", headers={"Cache-Control": "no-store"})

    async def status(request: Request) -> Response:
        given = request_token(request)
        host = request.client.host if request.client else "?"
        why = foreign(request.headers)
        if why is not None:
            return _error(await refuse_foreign("status", f"http:{host}", why))
        if not token_ok(given):
            return _error(await refuse_auth("status", f"http:{host}", given))
        return JSONResponse(await run_in_threadpool(controller.status))

    async def action(request: Request) -> Response:
        name = request.path_params["action"]
        host = request.client.host if request.client else "?"
        given = request_token(request)
        why = foreign(request.headers)
        if why is not None:
            return _error(await refuse_foreign(name, f"http:{host}", why))
        if not token_ok(given):
            return _error(await refuse_auth(name, f"http:{host}", given))
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            error = DataError("requests must be sent as Content-Type: application/json")
            await run_in_threadpool(controller.refuse, name, f"http:{host}", error)
            return _error(error)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            error = DataError(f"request body is not JSON: {exc}")
            await run_in_threadpool(controller.refuse, name, f"http:{host}", error)
            return _error(error)
        try:
            origin = _origin(body)
            if name not in ACTIONS and name != "thresholds":
                raise DataError(
                    f"unknown action {name!r}; actions: {', '.join((*ACTIONS, 'thresholds'))}"
                )
        except DataError as exc:
            await run_in_threadpool(controller.refuse, name, f"http:{host}", exc)
            return _error(exc)
        try:
            result = await run_in_threadpool(_dispatch, controller, name, body, origin)
        except ScopePilotError as exc:
            return _error(exc)
        return JSONResponse({"ok": True, **result})

    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        given = ws.query_params.get("token")
        host = ws.client.host if ws.client else "?"
        why = foreign(ws.headers)
        if why is not None or not token_ok(given):
            error = (
                await refuse_foreign("connect", f"ws:{host}", why)
                if why is not None
                else await refuse_auth("connect", f"ws:{host}", given)
            )
            await ws.send_json({"type": "error", "error": str(error), "kind": "AuthError"})
            await ws.close(code=4401)
            return
        await _stream(ws, controller, max_fps)

    routes = [
        Route("/", index),
        Route("/console.js", script),
        Route("/api/status", status),
        Route("/api/{action}", action, methods=["POST"]),
        WebSocketRoute("/ws", websocket),
    ]
    return Starlette(routes=routes)


def _origin(body: Any) -> str:
    if not isinstance(body, dict):
        raise DataError(f"request body must be a JSON object, got {type(body).__name__}")
    operator = body.get("operator", "operator")
    via = body.get("via", "api")
    for label, value in (("operator", operator), ("via", via)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise DataError(
                f"{label} must be 1-64 letters, digits or . @ + - _ characters, got {value!r}"
            )
    return f"{via}:{operator}"


def _dispatch(controller: Controller, name: str, body: dict[str, Any], origin: str) -> Any:
    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        value = body.get(key)
        if not isinstance(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            what = " or ".join(k.__name__ for k in kinds)
            error = DataError(f"{name} needs {key!r} ({what}) in the body, got {value!r}")
            controller.refuse(name, origin, error)
            raise error
        return value

    calls: dict[str, Callable[[], Any]] = {
        "pause": lambda: controller.pause(origin=origin),
        "resume": lambda: controller.resume(origin=origin),
        "abort": lambda: controller.abort(origin=origin, reason=str(body.get("reason", ""))),
        "lock": lambda: controller.take_lock(origin=origin),
        "unlock": lambda: controller.release_lock(origin=origin),
        "mode": lambda: controller.set_mode(need("mode", str), origin=origin),
        "approve": lambda: controller.approve(need("id", str), origin=origin),
        "veto": lambda: controller.veto(
            need("id", str), origin=origin, reason=str(body.get("reason", ""))
        ),
        "send": lambda: controller.send(need("command", (dict, str)), origin=origin),
        "thresholds": lambda: controller.set_thresholds(need("values", dict), origin=origin),
    }
    return calls[name]()


async def _stream(ws: WebSocket, controller: Controller, max_fps: float) -> None:
    """Push status (at most every 0.25 s, when it changed) and the newest frame (at most
    ``max_fps`` a second; a frame replaced before it could be sent is skipped, never queued)."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    armed = threading.Event()  # set while a wake-up is already on its way to the loop
    armed.set()

    def wake() -> None:
        if not armed.is_set():
            armed.set()
            loop.call_soon_threadsafe(changed.set)

    closed = asyncio.Event()

    async def receive() -> None:
        try:
            while True:
                await ws.receive_text()  # the page sends nothing we need; drain pings
        except (WebSocketDisconnect, RuntimeError):
            closed.set()
            changed.set()

    receiver = asyncio.create_task(receive())
    controller.add_waker(wake)
    frame_period = 1.0 / max_fps
    sent_version, sent_seq, sent_sr = -1, -1, -1
    frame_waiting = False  # a new frame is held back by the rate limit
    last_status = last_frame = last_sr = 0.0
    try:
        while not closed.is_set():
            changed.clear()
            armed.clear()
            now = time.monotonic()
            wait_s = 1.0
            version = controller.version
            if version != sent_version:
                due = last_status + _STATUS_INTERVAL_S - now
                if due <= 0:
                    status = await run_in_threadpool(controller.status)
                    await ws.send_text(json.dumps({"type": "status", "status": status}))
                    sent_version, last_status = version, now
                else:
                    wait_s = min(wait_s, due)
            latest = controller.latest_frame()
            frame_waiting = False
            if latest is not None and latest[0] != sent_seq:
                due = last_frame + frame_period - now
                frame_waiting = due > 0
                if due <= 0:
                    seq, frame = latest
                    perception = controller.perception_of(seq)
                    message = await run_in_threadpool(encode_frame, seq, frame, perception)
                    await ws.send_bytes(message)
                    sent_seq, last_frame = seq, now
                    continue  # another frame may be due already
                wait_s = min(wait_s, due)
            sr = controller.latest_product("sr")
            if sr is not None and sr[0] != sent_sr:  # the sr view, same rate limit as frames
                due = last_sr + frame_period - now
                if due <= 0:
                    seq, image = sr
                    perception = controller.perception_of(seq)
                    message = await run_in_threadpool(
                        encode_frame, seq, image, perception, view="sr"
                    )
                    await ws.send_bytes(message)
                    sent_sr, last_sr = seq, now
                    continue
                wait_s = min(wait_s, due)
            # While a frame waits for its slot, every later frame would wait for the same slot
            # and status is rate-limited too: sleep through the agent's events (one wake-up per
            # event costs the agent's loop CPU) until the next slot, unless the page goes away.
            await _wait(closed.wait() if frame_waiting else changed.wait(), wait_s)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the page went away
    finally:
        controller.remove_waker(wake)
        receiver.cancel()


async def _wait(awaitable: Awaitable[Any], timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, timeout=max(timeout_s, 0.001))
