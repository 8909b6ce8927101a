"""Command-line side of the operator console.

    scopepilot run --instrument sim:stm --mode supervised --out S.zarr --console \\
        [--console-host 127.0.0.1] [--console-port 8765] [--console-token-file TOKEN]
    scopepilot ctl status|pause|resume|abort|lock|unlock [--connect URL] [--token-file TOKEN]
    scopepilot ctl mode supervised | approve ID | veto ID | send '{"type": "MoveTo", ...}'
    scopepilot ctl thresholds max_uncertainty=0.4 ...

``ctl`` speaks the console's HTTP API (see :mod:`agent.console.app`) with the standard library
only, so that scripts can drive a session from anywhere Python runs. A refused request exits
with status 2 and prints the console's reason (wrong token, lock held, no such command, ...);
the refusal is recorded in the session like the accepted actions. A command that was accepted
but did not reach the instrument (rejected by the safety envelope, failed, suppressed) exits with
status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from drivers.errors import CommunicationError, ConfigError, DataError, ScopePilotError

Handler = Callable[[argparse.Namespace], int]

CTL_ACTIONS = (
    "status",
    "pause",
    "resume",
    "abort",
    "lock",
    "unlock",
    "mode",
    "approve",
    "veto",
    "send",
    "thresholds",
)
_NEEDS_VALUE = {"mode": "MODE", "approve": "ID", "veto": "ID", "send": "COMMAND_JSON"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    run = sub.choices.get("run")
    if run is not None:
        group = run.add_argument_group("operator console")
        group.add_argument(
            "--console", action="store_true", help="serve the web console while the session runs"
        )
        group.add_argument(
            "--console-host",
            default="127.0.0.1",
            help="address to bind (default 127.0.0.1; any other needs --console-token-file)",
        )
        group.add_argument("--console-port", type=int, default=8765, help="(default 8765)")
        group.add_argument(
            "--console-token-file",
            help="file holding the access token (created with a random token if missing; "
            "default: $SCOPEPILOT_TOKEN_FILE or $SCOPEPILOT_TOKEN if set, else no token)",
        )
        group.add_argument(
            "--console-fps",
            type=float,
            default=15.0,
            help="most frames per second sent to each page (default 15)",
        )
    ctl = sub.add_parser("ctl", help="control a running session through its console")
    ctl.add_argument("action", choices=CTL_ACTIONS)
    ctl.add_argument(
        "value",
        nargs="*",
        help="MODE for mode, ID for approve/veto, COMMAND_JSON for send, NAME=VALUE... for "
        "thresholds",
    )
    ctl.add_argument(
        "--connect", default="http://127.0.0.1:8765", help="console URL (default %(default)s)"
    )
    ctl.add_argument(
        "--token-file",
        help="file holding the console's access token (default: $SCOPEPILOT_TOKEN_FILE or "
        "$SCOPEPILOT_TOKEN, as for remote instruments)",
    )
    ctl.add_argument("--operator", default=_default_operator(), help="your name (recorded)")
    ctl.add_argument("--reason", default="", help="reason for veto or abort (recorded)")
    ctl.add_argument("--json", action="store_true", help="print the raw JSON reply")
    ctl.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return {"ctl": _cmd_ctl}


def _default_operator() -> str:
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        name = ""
    name = re.sub(r"[^\w.@+-]", "_", name)[:64]
    return name or "operator"


@contextlib.contextmanager
def console_for(agent: Any, args: argparse.Namespace) -> Iterator[Any]:
    """Serve the console beside ``agent`` while the ``with`` body runs, when ``--console``
    was given (yields the :class:`~agent.console.server.ConsoleServer`, or None)."""
    if not getattr(args, "console", False):
        yield None
        return
    from agent.console.server import ConsoleServer, read_or_create_token
    from agent.control import Controller

    token: str | None
    if args.console_token_file:
        token = read_or_create_token(args.console_token_file)
    else:  # the token the remote instruments use, if the environment names one
        from drivers.remote import read_token

        token = read_token(None, None)
    server = ConsoleServer(
        Controller(agent),
        host=args.console_host,
        port=args.console_port,
        token=token,
        max_fps=args.console_fps,
    )
    server.start()
    print(f"operator console: {server.url}", file=sys.stderr, flush=True)
    try:
        yield server
    finally:
        server.stop()


def _cmd_ctl(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"operator": args.operator, "via": "ctl"}
    value = list(args.value)
    if args.action in _NEEDS_VALUE:
        if not value:
            raise ConfigError(f"ctl {args.action} needs {_NEEDS_VALUE[args.action]}")
        if args.action == "send":
            body["command"] = " ".join(value)  # parsed (and refused if malformed) by the agent
        elif len(value) != 1:
            raise ConfigError(f"ctl {args.action} takes one {_NEEDS_VALUE[args.action]}")
        else:
            body[{"mode": "mode", "approve": "id", "veto": "id"}[args.action]] = value[0]
    elif args.action == "thresholds":
        body["values"] = _parse_thresholds(value)
    elif value:
        raise ConfigError(f"ctl {args.action} takes no value, got {' '.join(value)!r}")
    if args.action in ("veto", "abort") and args.reason:
        body["reason"] = args.reason
    from drivers.remote import read_token  # the remote instruments' token sources

    token = read_token(None, args.token_file)
    if args.action == "status":
        reply = request(args.connect, "GET", "/api/status", token=token, timeout_s=args.timeout)
    else:
        path = f"/api/{args.action}"
        reply = request(args.connect, "POST", path, body, token=token, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.action == "status":
        print(format_status(reply))
    else:
        text = f"{args.action}: {reply.get('effect', 'ok')}"
        if "command" in reply:
            command = reply["command"]
            text += f" — {command['text']}" + (f" ({reply['reason']})" if reply["reason"] else "")
        print(text)
    if reply.get("fate") in ("rejected", "failed", "suppressed"):
        return 1  # the request was accepted, but the command did not reach the instrument
    return 0


def _parse_thresholds(pairs: list[str]) -> dict[str, Any]:
    if not pairs:
        raise ConfigError("ctl thresholds needs NAME=VALUE pairs, e.g. max_uncertainty=0.4")
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"ctl thresholds expects NAME=VALUE, got {pair!r}")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"threshold {name}: {raw!r} is not a number (or null)") from None
    return values


def request(
    base_url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """One call to the console API; a refusal raises the matching :class:`ScopePilotError`
    (:class:`~agent.control.AuthError`, ``ControlLocked``, ``NoSuchCommand``, ``DataError``)
    with the console's message."""
    from agent.control import AuthError, ControlLocked, NoSuchCommand, OperatorError

    url = base_url.rstrip("/") + path
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--connect needs an http:// or https:// URL, got {base_url!r}")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        reply: Any = None
        try:
            reply = json.loads(exc.read())
            message = str(reply.get("error", reply))
        except ValueError:
            message = f"HTTP {exc.code} {exc.reason}"
        errors: dict[int, type[ScopePilotError]] = {
            400: DataError,
            401: AuthError,
            404: NoSuchCommand,
        }
        if exc.code == 409:
            kind = reply.get("kind") if isinstance(reply, dict) else None
            raise (ControlLocked if kind == "ControlLocked" else OperatorError)(message) from None
        raise errors.get(exc.code, CommunicationError)(message) from None
    except urllib.error.URLError as exc:
        raise CommunicationError(
            f"cannot reach the console at {base_url}: {exc.reason}; is the session running "
            f"with --console?"
        ) from None
    except (TimeoutError, OSError) as exc:
        raise CommunicationError(f"console at {base_url} did not answer: {exc}") from None
    except ValueError as exc:
        raise CommunicationError(f"console at {base_url} sent a malformed reply: {exc}") from None


def format_status(status: dict[str, Any]) -> str:
    """The status snapshot as a few readable lines."""
    lines = [
        f"state {status['state']}"
        + (f" ({status['stop_reason']})" if status.get("stop_reason") else "")
        + f", mode {status['mode']}, {status['frames']} frames, "
        f"instrument {status['instrument']['id']}, policy {status['policy']['name']}",
    ]
    lock = status["lock"]["holder"]
    lines.append(f"control lock: {'held by ' + lock if lock else 'free'}")
    frame = status.get("frame")
    if frame:
        tip = frame.get("tip")
        tip_text = f", tip {tip['state']} (uncertainty {tip['uncertainty']:.2f})" if tip else ""
        lines.append(f"frame #{frame['seq']} {frame['shape'][0]}x{frame['shape'][1]}{tip_text}")
    lines.append(f"pending ({len(status['pending'])}):")
    lines += [f"  {p['id']}  {p['text']}" for p in status["pending"]]
    lines.append("last decisions:")
    for d in status["decisions"][:5]:
        fates = ", ".join(f"{f['type']} {f['fate']}" for f in d["fates"]) or "no command"
        lines.append(f"  frame {d['frame']}: {d['reason']} -> {fates}")
    if status["latencies"]:
        lines.append(
            "latency (mean ms): "
            + ", ".join(f"{k} {v['mean_s'] * 1e3:.1f}" for k, v in status["latencies"].items())
        )
    for fault in status["faults"][:3]:
        lines.append(f"fault: {fault.get('stage', '?')}: {fault.get('error', '')}")
    return "\n".join(lines)
