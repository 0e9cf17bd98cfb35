"""The house is one-way: which rooms (packages of legend) may import which (docs/design.md, "Rooms and arrows")."""

import ast
from pathlib import Path

import pytest
from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "legend"

# room -> rooms it must never import (at run time: imports under `if TYPE_CHECKING:` are only annotations)
FORBIDDEN = {
    "strategies": {"engine", "flower", "report"},
    "engine": {"flower", "report"},
    "devices": {"engine", "flower", "report", "strategies"},
    "lora": {"engine", "flower", "report", "strategies", "devices"},
    "models": {"engine", "flower", "report", "strategies", "devices"},
    "data": {"engine", "flower", "report", "strategies", "devices", "models", "objectives"},
    "objectives": {"engine", "flower", "report", "strategies", "devices", "models", "lora"},
}
LEAVES = {"core", "records", "errors"}  # import no other room of legend


def room(module: str) -> str:
    return module.split(".")[1] if module.startswith("legend.") else ""


def runtime_imports(path: Path) -> set[str]:
    """The legend modules a file imports, leaving out those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "TYPE_CHECKING"
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("legend"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("legend"))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_room_imports_against_the_arrows(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    imported = {room(module) for module in runtime_imports(path)} - {own}
    if own in LEAVES:
        assert imported == set(), f"{own} is a leaf and imports {imported}"
    assert not imported & FORBIDDEN.get(own, set()), f"{path.name} ({own}) imports {imported & FORBIDDEN[own]}"


def test_report_calls_only_the_engines_entry_point():
    used = {module for path in (PACKAGE / "report").rglob("*.py") for module in runtime_imports(path) if room(module) == "engine"}
    assert used <= {"legend.engine.simulation"}
