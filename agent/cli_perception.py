"""``scopepilot train|evaluate|infer tip|sr|defects``: the perception models' commands.

Each model has a task module ``agent.perception.tasks.<name>`` with

- ``add_train_arguments(parser)`` and ``train(args) -> int`` (exit status),
- ``add_evaluate_arguments(parser)`` and ``evaluate(args) -> int``,
- ``infer(image, pixel_size_nm) -> dict`` (JSON-able result for one ``(H, W)`` image).

The task module is imported only when its command runs (so ``scopepilot`` starts fast and a
missing task module gives a clear error); its options are parsed from the rest of the command
line, so ``scopepilot train tip --help`` lists them.

``defects`` has two models: HAADF-STEM (``agent.perception.tasks.defects``, the default) and STM
topographs (``agent.perception.tasks.defects_stm``), chosen with ``--sample stem|stm``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from importlib import import_module
from types import ModuleType
from typing import Any

TASKS = ("tip", "sr", "defects")
SAMPLES = ("stem", "stm")
"""Sample kinds of the ``defects`` task (``--sample``); the first is the default."""


def register(sub: Any) -> dict[str, Any]:
    """Add ``train``, ``evaluate`` and ``infer`` to the ``scopepilot`` subcommands."""
    for command, help_text in (
        ("train", "train a perception model on simulator data"),
        ("evaluate", "evaluate a perception model on held-out simulated data"),
    ):
        p = sub.add_parser(
            command,
            help=help_text,
            description=f"{help_text}; run `scopepilot {command} TASK --help` for its options",
        )
        p.add_argument("task", choices=TASKS)
        p.add_argument("options", nargs=argparse.REMAINDER, help="options of the task")
    infer = sub.add_parser("infer", help="run a perception model on an image file")
    infer.add_argument("task", choices=TASKS)
    infer.add_argument("file", help="image file: .npy, .tif (others with scopepilot[formats])")
    infer.add_argument(
        "--pixel-size-nm",
        type=float,
        help="pixel size in nm (default: from the file, when it records one)",
    )
    infer.add_argument("--out", help="also write the result as JSON here")
    infer.add_argument(
        "--sample",
        choices=SAMPLES,
        default=SAMPLES[0],
        help="defects only: the model for STEM images (default) or STM topographs (metres)",
    )
    return {"train": _cmd_train, "evaluate": _cmd_evaluate, "infer": _cmd_infer}


def task_module(task: str, sample: str = SAMPLES[0]) -> ModuleType:
    """The task module of ``task`` (for ``defects``, of the ``sample`` kind), or a
    :class:`~drivers.errors.ModelError` saying it is not available."""
    from drivers.errors import ModelError

    if task not in TASKS:
        raise ModelError(f"unknown perception task {task!r}; known: {', '.join(TASKS)}")
    if sample not in SAMPLES:
        raise ModelError(f"unknown sample kind {sample!r}; known: {', '.join(SAMPLES)}")
    if sample != SAMPLES[0] and task != "defects":
        raise ModelError(f"--sample {sample} applies to the defects task only, not {task!r}")
    name = f"agent.perception.tasks.{task}" + ("" if sample == SAMPLES[0] else f"_{sample}")
    try:
        return import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ModelError(
            f"the {task!r} model is not available in this installation ({name} is missing)"
        ) from None


def _sample_of(task: str, options: Sequence[str]) -> str:
    """The ``--sample`` among a ``defects`` command's options (the default when absent)."""
    if task != "defects":
        return SAMPLES[0]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sample", choices=SAMPLES, default=SAMPLES[0])
    known, _ = parser.parse_known_args(list(options))
    return str(known.sample)


def _task_options(command: str, task: str, module: ModuleType, options: Sequence[str]) -> Any:
    parser = argparse.ArgumentParser(prog=f"scopepilot {command} {task}")
    if task == "defects":
        parser.add_argument(
            "--sample",
            choices=SAMPLES,
            default=SAMPLES[0],
            help="the model for STEM images (default) or for STM topographs",
        )
    getattr(module, f"add_{command}_arguments")(parser)
    return parser.parse_args(list(options))


def _cmd_train(args: argparse.Namespace) -> int:
    module = task_module(args.task, _sample_of(args.task, args.options))
    return int(module.train(_task_options("train", args.task, module, args.options)))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    module = task_module(args.task, _sample_of(args.task, args.options))
    return int(module.evaluate(_task_options("evaluate", args.task, module, args.options)))


def _cmd_infer(args: argparse.Namespace) -> int:
    from agent.perception.files import read_image
    from drivers.errors import DataError

    image, file_pixel_nm = read_image(args.file)
    pixel_nm = args.pixel_size_nm if args.pixel_size_nm is not None else file_pixel_nm
    if pixel_nm is None:
        raise DataError(f"{args.file} does not record its pixel size: pass --pixel-size-nm")
    if not (math.isfinite(pixel_nm) and pixel_nm > 0):
        raise DataError(f"--pixel-size-nm must be a positive number, got {pixel_nm!r}")
    result = task_module(args.task, args.sample).infer(image, pixel_nm)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
    shown = {key: _brief(value, args.out) for key, value in result.items()}
    sys.stdout.write(json.dumps(shown, indent=2) + "\n")
    return 0


def _brief(value: object, out: str | None) -> object:
    """Whole images (nested lists, e.g. sr's ``image`` and ``sigma``) are too long for a
    terminal: the terminal gets their shape, the ``--out`` file gets them whole."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        shape = f"{len(value)}x{len(value[0])}"
        where = f"in {out}" if out else "pass --out FILE.json to save it"
        return f"<{shape} array: {where}>"
    return value
