"""The fast subset (`python -m pytest -q -m "not slow"`) leaves out exactly the tests tests/conftest.py lists as slow."""

import ast

from tests.conftest import ROOT, SLOW


def test_every_slow_entry_names_a_test_that_exists():
    """A renamed or deleted test would otherwise leave a stale entry, and its new name would join the fast subset unnoticed."""
    missing = []
    for entry in sorted(SLOW):
        file, name = entry.split("::")
        path = ROOT / "tests" / file
        defined = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)} if path.is_file() else set()
        if name.split("[")[0] not in defined:
            missing.append(entry)
    assert not missing, f"tests/conftest.py SLOW names tests that do not exist: {missing}"
