"""The ``scopepilot`` command line.

scopepilot run --instrument sim:stm --policy rule --frames 300 --out S.zarr --seed 1
scopepilot summary S.zarr [--png S.png]
scopepilot export S.zarr --tiff S.ome.tif
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from drivers.errors import ScopePilotError
from drivers.protocol import SPM_KINDS

log = logging.getLogger("scopepilot")


Handler = Callable[[argparse.Namespace], int]

# Subcommands that live in their own modules. Each module has
# ``register(sub: argparse._SubParsersAction) -> dict[str, Handler]``; it adds its parsers and
# returns the handler of each command name. Keep those modules light at import time (import heavy
# libraries inside the handlers): every `scopepilot` invocation imports all of them.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.cli_perception",
    "agent.cli_reliability",
    "agent.cli_policies",
    "agent.cli_remote",
    "agent.cli_console",
)


def _package_version() -> str:
    try:
        return version("scopepilot")
    except PackageNotFoundError:
        return "unknown"


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="scopepilot", description="Autonomous microscope control agent."
    )
    parser.add_argument("--version", action="version", version=_package_version())
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an agent session against an instrument")
    run.add_argument("--instrument", default="sim:stm", help="instrument URI (default sim:stm)")
    run.add_argument(
        "--policy",
        default="rule",
        help="policy name: rule, none, rl, rl-tip, rl-dose or rl-scan (default rule)",
    )
    run.add_argument("--frames", type=int, default=100, help="frames to acquire (default 100)")
    run.add_argument("--out", help="session store to create (S.zarr)")
    run.add_argument(
        "--resume",
        metavar="S.zarr",
        help="continue an interrupted session in that store (all settings come from it)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing store")
    run.add_argument("--seed", type=int, default=0, help="simulator seed (sim: URIs only)")
    run.add_argument("--mode", default="autonomous", choices=["autonomous", "supervised", "manual"])
    run.add_argument(
        "--shape", type=int, help="frame size in pixels, square (default: the instrument's)"
    )
    run.add_argument(
        "--size-nm", type=float, help="scan size in nm, square (default: instrument's)"
    )
    run.add_argument("--dwell-us", type=float, help="dwell per pixel in µs (default: instrument's)")
    run.add_argument(
        "--sim",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="simulator option, e.g. --sim surface=hsi100 (sim: URIs only; repeatable)",
    )
    run.add_argument(
        "--free-running",
        action="store_true",
        help="scan continuously instead of waiting for each decision",
    )
    run.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option over the policy's defaults, e.g. sr=true for rl-dose with a policy "
        "trained with --sr, or weights=F (value as JSON; repeatable)",
    )
    run.add_argument(
        "--target-snr",
        type=float,
        help="rule policy: keep the image SNR near this by changing the dwell (default 5 for "
        "STEM/SEM, off for STM/AFM; 0 switches it off)",
    )
    run.add_argument(
        "--assessor",
        help="tip assessor: classical, tipnet (the tip network, classical fallback) or none "
        "(default on STM/AFM: tipnet with --policy rl/rl-tip, which were trained on its "
        "outputs, classical otherwise; none on STEM/SEM)",
    )
    run.add_argument(
        "--perception",
        help="frame stages run and recorded on every frame, comma-separated: sr (recovered "
        "image + uncertainty), defects (defect list; the STEM model on STEM/SEM, the STM model "
        "on STM/AFM) or none (default: sr,defects on STEM; defects on STM when the scan's "
        "pixels are 0.03-0.12 nm, as the default 256 px over 16 nm; none elsewhere; frames "
        "outside a model's pixel sizes are recorded as rejected)",
    )
    run.add_argument(
        "--no-sr-image",
        action="store_true",
        help="record only the sr uncertainty summary, not the recovered image (smaller store)",
    )
    run.add_argument(
        "--early-abort",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="abort an SPM scan when the tip changes mid-scan (needs --assessor tipnet; "
        "default: on with tipnet)",
    )
    run.add_argument("--png", help="also write the overview figure here")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    summary = sub.add_parser("summary", help="summarise a session store")
    summary.add_argument("store")
    summary.add_argument("--png", help="overview figure path (default: STORE without .zarr + .png)")
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")

    export = sub.add_parser("export", help="export a session's frames")
    export.add_argument("store")
    export.add_argument("--tiff", required=True, help="OME-TIFF output path")
    export.add_argument("--overwrite", action="store_true")
    handlers: dict[str, Handler] = {"run": _cmd_run, "summary": _cmd_summary, "export": _cmd_export}
    for name in COMMAND_MODULES:
        handlers.update(import_module(name).register(sub))
    return parser, handlers


def _parse_sim_options(pairs: Sequence[str]) -> dict[str, Any]:
    from drivers.errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--sim expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _stage_names(given: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """``--perception`` as stage names: the default when not given, none for ``none``."""
    if given is None:
        return tuple(default)
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    return () if names == ("none",) else names


def _stage_options(
    stages: Sequence[str], kind: str, *, no_sr_image: bool
) -> dict[str, dict[str, Any]]:
    """The ``perception_options`` ``run`` stores: the sr image left out with ``--no-sr-image``;
    the defects model for ``kind`` named, so that the session rebuilds with the model that ran
    whatever later defaults say."""
    from agent.perception.stages import defects_sample

    options: dict[str, dict[str, Any]] = {}
    if no_sr_image and "sr" in stages:
        options["sr"] = {"record": "none"}
    if "defects" in stages:
        options["defects"] = {"sample": defects_sample(kind)}
    return options


def _planned_pixel_nm(instrument: Any, scan: Mapping[str, Any]) -> float | None:
    """The pixel size (nm, along x) of the frames ``run`` will ask for: the command-line
    ``scan`` settings over the instrument's current scan; None when unknown."""
    try:
        state = instrument.state()
    except ScopePilotError:
        return None
    region = scan.get("region", state.scan_region)
    shape = scan.get("shape_px", state.shape_px)
    return float(region.width_m) / int(shape[1]) * 1e9


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from agent.cli_reliability import parse_options
    from agent.gate import Mode
    from agent.loop import AgentConfig, Step
    from agent.perception.stages import default_stages
    from agent.pipeline import (
        build_pipeline,
        default_assessor,
        default_policy_options,
        recorded_config,
    )
    from agent.recorder import SessionRecorder
    from agent.session import Session
    from agent.summary import format_summary, summarize
    from drivers.commands import Scan
    from drivers.errors import ConfigError
    from drivers.frame import ScanRegion
    from drivers.registry import open_instrument

    plan = None
    if args.resume is not None:
        from agent.resume import ContinuedRecorder, apply_plan, plan_resume

        if args.policy_option:
            raise ConfigError(
                "--resume continues with the stored policy options; drop --policy-option"
            )

        plan = plan_resume(args.resume)
        args = apply_plan(args, plan)
    elif args.out is None:
        raise ConfigError("run needs --out S.zarr (a new store) or --resume S.zarr")
    if args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    options: dict[str, Any] = {}
    if args.instrument.startswith("sim:"):
        options = {"seed": args.seed, **_parse_sim_options(args.sim)}
    elif args.sim:
        raise ConfigError("--sim options apply to sim: instruments only")
    scan: dict[str, Any] = {}
    if args.shape is not None:
        scan["shape_px"] = (args.shape, args.shape)
    if args.dwell_us is not None:
        scan["dwell_s"] = args.dwell_us * 1e-6
    if args.size_nm is not None:
        scan["region"] = ScanRegion(0.0, 0.0, args.size_nm * 1e-9, args.size_nm * 1e-9)
    instrument = open_instrument(args.instrument, **options)
    try:
        kind = instrument.info().kind
        assessor = args.assessor or default_assessor(kind, args.policy)
        pixel_nm = _planned_pixel_nm(instrument, scan)
        stages = _stage_names(args.perception, default_stages(kind, pixel_size_nm=pixel_nm))
        early_abort = args.early_abort
        if early_abort is None:
            early_abort = assessor == "tipnet" and kind in SPM_KINDS
        config = {  # the session config; agent.pipeline rebuilds perception + policy from it
            "instrument": args.instrument,
            "policy": args.policy,
            "policy_options": {
                **default_policy_options(args.policy, kind, args.target_snr),
                **parse_options(args.policy_option, "--policy-option"),
            },
            "assessor": assessor,
            "assessor_options": {},
            "quality": "snr",
            "perception": list(stages),
            "perception_options": _stage_options(stages, kind, no_sr_image=args.no_sr_image),
            "early_abort": early_abort,
            "frames": args.frames,
            "seed": args.seed,
            "mode": args.mode,
            "shape": args.shape,
            "size_nm": args.size_nm,
            "dwell_us": args.dwell_us,
            "sim_options": _parse_sim_options(args.sim),
            "lockstep": not args.free_running,
        }
        if plan is not None:  # the stored session config, exactly as the first part ran
            config = recorded_config(plan.config, plan.versions)
        pipeline = build_pipeline(config, kind=kind)
        versions = {"scopepilot": _package_version(), **pipeline.versions()}
        for warning in pipeline.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        if plan is not None:  # before anything reaches the instrument
            plan.check_compatible(kind, versions)
        if scan:  # scan settings go through the instrument's envelope like any other command
            instrument.execute(Scan(source="console", reason="command-line scan settings", **scan))
        if plan is not None:
            recorder = SessionRecorder.reopen(plan.path)
        else:
            recorder = SessionRecorder(
                args.out, overwrite=args.overwrite, config=config, versions=versions
            )
    except BaseException:
        instrument.close()
        raise
    try:
        bar = tqdm(total=args.frames, unit="frame", disable=args.quiet, dynamic_ncols=True)

        def on_step(step: Step) -> None:
            executed = [f.command.kind for f in step.fates if f.fate in ("executed", "pending")]
            if step.problems:
                seen = "flagged"
            elif step.tip is not None:
                seen = f"tip {step.tip.state}"
            else:
                seen = "no tip"
            bar.set_postfix_str(
                seen + (f" -> {', '.join(executed)}" if executed else ""),
                refresh=False,
            )
            bar.update(1)

        agent = pipeline.agent(
            instrument,
            recorder=recorder if plan is None else ContinuedRecorder(recorder, plan.frames_before),
            config=AgentConfig(
                frames=args.frames, mode=Mode(args.mode), lockstep=not args.free_running
            ),
            on_step=on_step,
        )
        previous = signal.signal(
            signal.SIGINT, lambda *_: agent.abort(origin="console", reason="Ctrl-C")
        )
        try:
            if plan is not None:
                recorder.append_event("status", plan.status_payload())
            from agent.cli_console import console_for

            with console_for(agent, args):  # --console: the web console beside the session
                result = agent.run()
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
        recorder.set_summary({"latency_s": {k: v.to_json() for k, v in result.latencies_s.items()}})
    finally:
        recorder.close()
        instrument.close()
    session = Session(args.out)
    summary = summarize(session.frame_records(), session.events(), latencies_s=result.latencies_s)
    print(format_summary(summary))
    print(f"session stored in {args.out}")
    if args.png:
        from agent.plots import plot_session_overview

        plot_session_overview(session, args.png)
        print(f"overview figure: {args.png}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from agent.plots import plot_session_overview
    from agent.session import Session
    from agent.summary import format_summary, summarize

    session = Session(args.store)
    stored = session.summary or {}
    summary = summarize(
        session.frame_records(), session.events(), latencies_s=stored.get("latency_s")
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    png = args.png or str(Path(args.store).with_suffix("")) + ".png"
    plot_session_overview(session, png)
    if not args.json:
        print(f"overview figure: {png}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from agent.export import export_ome_tiff

    count = export_ome_tiff(args.store, args.tiff, overwrite=args.overwrite)
    print(f"wrote {count} frames to {args.tiff}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return handlers[args.command](args)
    except ScopePilotError as exc:
        print(f"scopepilot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
