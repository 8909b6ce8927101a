"""``scopepilot serve`` and ``scopepilot serve-nanonis`` (registered through
``agent.cli.COMMAND_MODULES``).

scopepilot serve --instrument sim:stm --host 127.0.0.1 --port 9090 --token-file TOKEN
scopepilot serve-nanonis --port 6501 --seed 1

Agents then connect with ``--instrument pyro:127.0.0.1:9090`` (token from
``SCOPEPILOT_TOKEN`` or ``SCOPEPILOT_TOKEN_FILE``) or ``--instrument nanonis:127.0.0.1:6501``.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def register(sub: Any) -> dict[str, Handler]:
    serve = sub.add_parser("serve", help="serve an instrument over Pyro5 to remote agents")
    serve.add_argument("--instrument", default="sim:stm", help="instrument URI (default sim:stm)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=9090, help="port (0 picks a free one)")
    serve.add_argument(
        "--token-file",
        help="file holding the shared token clients must present (required off loopback; "
        "default: SCOPEPILOT_TOKEN / SCOPEPILOT_TOKEN_FILE)",
    )
    serve.add_argument("--limits", help="JSON file of operator limits that narrow the envelope")
    serve.add_argument(
        "--tls-cert", help="PEM certificate: serve over TLS (clients set SCOPEPILOT_TLS_CA)"
    )
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    _simulator_options(serve)

    emulator = sub.add_parser(
        "serve-nanonis",
        help="emulate a Nanonis controller's TCP interface over the STM simulator",
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    emulator.add_argument("--port", type=int, default=6501, help="port (0 picks a free one)")
    emulator.add_argument(
        "--line-ms", type=float, default=2.0, help="wall time per scanned line (default 2 ms)"
    )
    _simulator_options(emulator)
    return {"serve": _cmd_serve, "serve-nanonis": _cmd_serve_nanonis}


def _simulator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (sim: only)")
    parser.add_argument("--shape", type=int, help="frame size in pixels, square")
    parser.add_argument("--size-nm", type=float, help="scan size in nm, square")
    parser.add_argument("--dwell-us", type=float, help="dwell per pixel in µs")
    parser.add_argument(
        "--sim",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="simulator option, e.g. --sim surface=hsi100 (repeatable)",
    )


def _sim_options(args: argparse.Namespace) -> dict[str, Any]:
    from agent.cli import _parse_sim_options
    from drivers.frame import ScanRegion

    options: dict[str, Any] = {"seed": args.seed, **_parse_sim_options(args.sim)}
    if args.shape is not None:
        options["shape_px"] = (args.shape, args.shape)
    if args.dwell_us is not None:
        options["dwell_s"] = args.dwell_us * 1e-6
    if args.size_nm is not None:
        options["region"] = ScanRegion(0.0, 0.0, args.size_nm * 1e-9, args.size_nm * 1e-9)
    return options


def _until_stopped() -> None:
    """Make SIGTERM end the serving loop like Ctrl-C."""

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _operator_limits(path: str | None) -> Any:
    from drivers.errors import ConfigError
    from drivers.limits import Limits

    if path is None:
        return None
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the limits file {path!r}: {exc}") from None
    return Limits.from_json(obj)


def _cmd_serve(args: argparse.Namespace) -> int:
    from drivers.errors import ConfigError
    from drivers.registry import open_instrument
    from drivers.remote import InstrumentServer, read_token

    token = read_token(None, args.token_file)
    limits = _operator_limits(args.limits)
    if args.instrument.startswith("sim:"):
        options = _sim_options(args)
    elif args.sim or args.shape or args.size_nm or args.dwell_us:
        raise ConfigError("--sim, --shape, --size-nm and --dwell-us apply to sim: instruments only")
    else:
        options = {}
    instrument = open_instrument(args.instrument, **options)
    try:
        server = InstrumentServer(
            instrument,
            host=args.host,
            port=args.port,
            token=token,
            operator_limits=limits,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        _until_stopped()
        print(
            f"serving {args.instrument} as {server.uri} "
            f"({'token required' if token else 'no token: loopback only'}"
            f"{', TLS' if args.tls_cert else ''}); Ctrl-C stops",
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass  # Ctrl-C or SIGTERM: a normal stop
        finally:
            server.close()
        print("stopped", flush=True)
    finally:
        instrument.close()
    return 0


def _cmd_serve_nanonis(args: argparse.Namespace) -> int:
    from drivers.errors import ConfigError
    from drivers.nanonis.emulator import NanonisEmulator
    from drivers.remote.daemon import is_loopback

    if not is_loopback(args.host):
        raise ConfigError(
            f"the Nanonis protocol has no authentication; serve the emulator on loopback, not "
            f"{args.host!r}"
        )
    if args.line_ms < 0:
        raise ConfigError(f"--line-ms must be >= 0, got {args.line_ms}")
    emulator = NanonisEmulator(
        host=args.host, port=args.port, line_delay_s=args.line_ms / 1000, **_sim_options(args)
    )
    _until_stopped()
    print(f"emulating a Nanonis controller as {emulator.address}; Ctrl-C stops", flush=True)
    try:
        emulator.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: a normal stop
    finally:
        emulator.close()
    print("stopped", flush=True)
    return 0
