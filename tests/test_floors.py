"""The house's floors (DESIGN.md): shared is the ground; client and server stand side by
side on it and never import each other; simulations stands on all three; the roof
(cli.py) may import anything. Imports inside functions count too, and every import of a
floor goes through the installed namespace (`fedclif.shared`, never a bare `shared`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"shared": 0, "client": 1, "server": 1, "simulations": 2}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def floor_files() -> list[tuple[str, Path]]:
    return [(top, f) for top in FLOORS for f in sorted((ROOT / top).rglob("*.py"))]


def test_no_import_runs_up_or_sideways():
    bad = []
    for top, f in floor_files():
        for line, name in imports(f):
            parts = name.split(".")
            if parts[0] == "fedclif" and len(parts) > 1 and parts[1] in FLOORS:
                other = parts[1]
                if other != top and FLOORS[other] >= FLOORS[top]:
                    bad.append(f"{f.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the floors:\n" + "\n".join(bad)


def test_floors_are_imported_through_the_namespace():
    """A bare `import shared...` would load a second copy of a module, outside the
    installed package (and fail in a wheel)."""
    files = [f for _, f in floor_files()] + [ROOT / "cli.py"]
    files += sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {name}"
        for f in files
        for line, name in imports(f)
        if name.split(".")[0] in FLOORS
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above finds imports inside functions (a planted one, to be sure)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from fedclif.server.run import FederatedRun\n")
    assert imports(f) == [(2, "fedclif.server.run")]
