"""Import direction (ARCHITECTURE.md) is enforced: contracts hold, drivers stay light."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["importlinter"]["contracts"])


def test_pyproject_forbids_the_imports_architecture_md_forbids() -> None:
    forbidden: dict[str, set[str]] = {}
    for contract in _contracts():
        if contract["type"] == "forbidden":
            for source in contract["source_modules"]:  # type: ignore[attr-defined]
                forbidden.setdefault(source, set()).update(contract["forbidden_modules"])  # type: ignore[arg-type]
    assert {"agent", "policies"} <= forbidden["drivers"]
    assert {"agent", "policies", "drivers.sim"} <= forbidden["simulators"]
    assert {"agent"} <= forbidden["policies"]


def test_import_linter_contracts_are_kept() -> None:
    # Same interpreter as the tests, run from the repository root, no cache files left behind.
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in report, report


def test_import_drivers_pulls_in_no_simulator_agent_or_policy() -> None:
    code = (
        "import json, sys, drivers; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('simulators', 'agent', 'policies') or m == 'drivers.sim')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
