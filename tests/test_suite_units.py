"""The suite's own scheduling: every module that uses the memoized reference run is in the one xdist unit that
trains it once (tests/conftest.py), so a new user of it cannot silently train it a second time on the other worker."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import SHARED_RUN_UNITS

TESTS = Path(__file__).resolve().parent


def imports_the_reference_run(path: Path) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "tests.pretrain_runs"
               and "debug_run" in {alias.name for alias in node.names} for node in ast.walk(ast.parse(path.read_text())))


def test_every_module_that_uses_the_reference_run_is_in_its_unit():
    users = {path.name for path in TESTS.glob("test_*.py") if imports_the_reference_run(path)}
    assert users and users == {name for name, unit in SHARED_RUN_UNITS.items() if unit == "debug_run"}
