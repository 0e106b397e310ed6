"""The codebase's shape, checked by maintained tools: import layers and no cycles (import-linter), no private
name imported across modules (ruff's PLC2701), no library or tier module over 400 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("shared", "user_agent", "edge_server", "cloud_server")
MAX_LINES = 400


def tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is not installed in this environment: `make setup` installs the test extras")
    return str(path)


def test_import_contracts_hold() -> None:
    """The contracts in pyproject.toml: tools over tiers over the library's own layers, and no import cycles."""
    proc = subprocess.run([tool("lint-imports"), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_private_name_is_imported_across_modules() -> None:
    proc = subprocess.run([tool("ruff"), "check", "--preview", "--select", "PLC2701", "--output-format", "concise",
                           "--no-cache", *CODE, "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for package in CODE for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules by concern: {long}"
