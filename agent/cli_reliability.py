"""``scopepilot replay`` and ``scopepilot diff`` (registered through ``agent.cli.COMMAND_MODULES``).

scopepilot replay S.zarr --policy rule --policy-option bad_frames_to_act=3 --out R.zarr
scopepilot diff S.zarr R.zarr [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def register(sub: Any) -> dict[str, Handler]:
    replay = sub.add_parser(
        "replay",
        help="re-run perception and a (possibly different) policy on a recorded session",
    )
    replay.add_argument("store", help="recorded session store (S.zarr)")
    replay.add_argument("--out", required=True, help="replay session store to create (R.zarr)")
    replay.add_argument("--policy", help="policy name (default: the recorded one)")
    replay.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option, e.g. bad_frames_to_act=3 (value as JSON; repeatable)",
    )
    replay.add_argument("--assessor", help="tip assessor name (default: the recorded one)")
    replay.add_argument(
        "--assessor-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tip assessor option, e.g. ghost_at=0.3 (value as JSON; repeatable)",
    )
    replay.add_argument("--quality", help="image-quality assessor name (snr or none)")
    replay.add_argument("--overwrite", action="store_true", help="replace an existing R.zarr")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")

    diff = sub.add_parser(
        "diff", help="where two sessions over the same frames decided differently"
    )
    diff.add_argument("a", help="a session store (e.g. the recorded S.zarr)")
    diff.add_argument("b", help="another session store over the same frames (e.g. R.zarr)")
    diff.add_argument("--json", action="store_true", help="print the diff as JSON")
    diff.add_argument("--limit", type=int, default=50, help="differing frames to list (default 50)")
    return {"replay": _cmd_replay, "diff": _cmd_diff}


def parse_options(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a mapping; values parsed as JSON when they are JSON."""
    from drivers.errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from agent.replay import replay_session
    from agent.session import Session

    overrides: dict[str, Any] = {}
    if args.policy is not None:
        overrides["policy"] = args.policy
    if args.assessor is not None:
        overrides["assessor"] = args.assessor
    if args.quality is not None:
        overrides["quality"] = args.quality
    recorded = Session(args.store)
    if args.policy_option:
        same = args.policy is None or args.policy == recorded.config.get("policy")
        base = dict(recorded.config.get("policy_options") or {}) if same else {}
        overrides["policy_options"] = {
            **base,
            **parse_options(args.policy_option, "--policy-option"),
        }
    if args.assessor_option:
        same = args.assessor is None or args.assessor == recorded.config.get("assessor")
        base = dict(recorded.config.get("assessor_options") or {}) if same else {}
        overrides["assessor_options"] = {
            **base,
            **parse_options(args.assessor_option, "--assessor-option"),
        }
    with tqdm(total=len(recorded), unit="frame", disable=args.quiet, dynamic_ncols=True) as bar:
        result = replay_session(
            args.store,
            args.out,
            overrides=overrides,
            overwrite=args.overwrite,
            on_frame=lambda _row: bar.update(1),
        )
    speed = (
        f"; the instrument took {result.recorded_scan_s:.1f} s to scan them "
        f"({result.recorded_scan_s / result.seconds:.0f}x)"
        if result.recorded_scan_s > 0 and result.seconds > 0
        else ""
    )
    print(
        f"replayed {result.frames} frames in {result.seconds:.2f} s{speed}; "
        f"{result.acted} decisions with commands; {result.stop_reason}"
    )
    print(f"replay stored in {result.out}; compare: scopepilot diff {args.store} {result.out}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from agent.replay import diff_sessions, format_diff

    diff = diff_sessions(args.a, args.b)
    if args.json:
        print(json.dumps(diff.to_json(), indent=2))
    else:
        print(format_diff(diff, limit=args.limit))
    return 0
