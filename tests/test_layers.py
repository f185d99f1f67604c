"""Dependencies point inwards (ARCHITECTURE.md): no module imports the CLI, the router and domain stay below agents."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "codemind_dagster"


def imports(path: Path) -> set[str]:
    """Every codemind_dagster module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("codemind_dagster")}


def modules(under: str) -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py")) if (PACKAGE / under).is_dir() else [PACKAGE / f"{under}.py"]


def offenders(under: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in modules(under):
        hits = sorted(m for m in imports(path) if m.startswith(forbidden))
        if hits:
            bad[str(path.relative_to(PACKAGE))] = hits
    return bad


@pytest.mark.parametrize(("under", "forbidden"), [
    # The CLI is the outermost layer: commands, the demo and everything below never import it back.
    ("commands", ("codemind_dagster.cli",)),
    ("demo", ("codemind_dagster.cli",)),
    ("status", ("codemind_dagster.cli", "codemind_dagster.commands")),
    # The router depends on the task contract in domain/, not on the agents that use it.
    ("resources/llm", ("codemind_dagster.agents", "codemind_dagster.assets", "codemind_dagster.commands")),
    # Pure models and rules: no agents, resources, assets, sensors or commands.
    ("domain", ("codemind_dagster.agents", "codemind_dagster.resources", "codemind_dagster.assets",
                "codemind_dagster.sensors", "codemind_dagster.commands", "codemind_dagster.cli")),
])
def test_dependencies_point_inwards(under: str, forbidden: tuple[str, ...]):
    assert offenders(under, forbidden) == {}


def test_the_scan_sees_lazy_imports(tmp_path: Path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from codemind_dagster.cli import main\n    import codemind_dagster.agents.coding\n")
    assert imports(sample) >= {"codemind_dagster.cli", "codemind_dagster.cli.main", "codemind_dagster.agents.coding"}
