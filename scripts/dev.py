#!/usr/bin/env python3
"""Set up (or refresh) the project's virtual environment and run the demo or the tests.

    python3.11 scripts/dev.py demo     # a simulated STM session with the rule policy
    python3.11 scripts/dev.py test     # lint, type check and the test suite

The environment lives in ``.venv`` next to pyproject.toml. It is (re)installed when it is
missing or when pyproject.toml changed since the last install. Only the standard library is used
here, so this runs on a fresh Python 3.11.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".scopepilot-install-stamp"
TORCH = "2.13.0"  # a CPU build of this version installs quickly; see README


def _run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.returncode)


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (this file runs before any venv exists)
        raise SystemExit(f"scopepilot needs Python >= 3.11; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
    _run(BIN / "python", "-m", "pip", "install", "--quiet", f"torch=={TORCH}")
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test,rl]")
    STAMP.write_text(wanted)


def demo(extra: list[str]) -> None:
    out = ROOT / "demo-session.zarr"
    _run(
        BIN / "scopepilot",
        "run",
        "--instrument",
        "sim:stm",
        "--policy",
        "rule",
        "--frames",
        "300",
        "--seed",
        "1",
        "--out",
        out,
        "--overwrite",
        "--png",
        ROOT / "demo-session.png",
        *extra,
    )


def test(extra: list[str]) -> None:
    _run(BIN / "ruff", "check", "agent", "drivers", "policies", "simulators", "tests", "bench")
    _run(BIN / "mypy")
    _run(BIN / "python", "-m", "pytest", "-q", *extra)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        raise SystemExit("usage: python3.11 scripts/dev.py demo|test|setup [extra args]")
    ensure_env()
    action, extra = sys.argv[1], sys.argv[2:]
    if action == "demo":
        demo(extra)
    elif action == "test":
        test(extra)


if __name__ == "__main__":
    main()
