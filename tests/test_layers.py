"""The gateway's packages import one way only, as docs/architecture.md draws them.

Every import under gateway/ is read from the source (those inside functions and under
TYPE_CHECKING too) and checked against the layers below: a unit may import only units of a
lower layer, never one of its own layer or a higher one, so no circle between packages can
form. The simulator stands apart and shares only the wire constants.

Tests import one way too: a test module is pytest's alone to import, so what several tests
share lives in a helper module (tests/fake_ews.py, tests/integration/processes.py, ...).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"

# Highest first. A unit is a package under gateway/ or one of the loose modules.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__main__"}),
    frozenset({"cli"}),
    frozenset({"serving"}),
    frozenset({"app"}),
    frozenset({"config"}),
    frozenset({"api"}),
    frozenset({"telemetry"}),
    frozenset({"guards", "exchange"}),
    frozenset({"errors", "wire", "__init__"}),
)
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}
# The simulator answers as Exchange does; it shares the wire constants, not the client's code.
SIMULATOR_MAY_IMPORT = frozenset({"wire", "__init__"})
MAX_LOOSE_MODULES = 10


def unit_of(module: str) -> str:
    """Return the unit of a dotted module name under gateway ("gateway.api.routes" -> "api")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line, module) for every import of a gateway module in the file at PATH."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gateway":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "gateway":
                continue
            if base == "gateway":  # `from gateway import api`: each name is a unit
                for alias in node.names:
                    name = alias.name
                    yield node.lineno, name if name == "__version__" else f"gateway.{name}"
            else:
                yield node.lineno, base


def edges() -> Iterator[tuple[str, int, str, str]]:
    """Yield (file, line, importing unit, imported unit) for imports across units."""
    for path in sorted(PACKAGE.rglob("*.py")):
        source_unit = unit_of(module_name(path))
        for line, module in imported_modules(path):
            target_unit = "__init__" if module == "__version__" else unit_of(module)
            if target_unit != source_unit:
                yield str(path.relative_to(PACKAGE.parent)), line, source_unit, target_unit


def test_every_unit_has_a_layer() -> None:
    """A new package or loose module must be placed in a layer before it can be imported."""
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units - {"simulator"} <= set(LAYER_OF), "add the new unit to LAYERS"


def test_imports_point_down_only() -> None:
    """No unit imports one of its own layer or a higher one; the simulator only the wire."""
    wrong = []
    for file, line, source, target in edges():
        if source == "simulator" or target == "simulator":
            allowed = target in SIMULATOR_MAY_IMPORT or source in {"cli", "__main__"}
        else:
            allowed = LAYER_OF[target] > LAYER_OF[source]
        if not allowed:
            wrong.append(f"{file}:{line}: {source} imports {target}")
    assert wrong == []


def test_at_most_ten_loose_modules() -> None:
    loose = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_package_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc is not None
    assert "May import:" in doc


def absolute_imports(source: str, package: str) -> Iterator[tuple[int, str]]:
    """Yield (line, dotted name) for each module and name imported by SOURCE, in PACKAGE."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def owning_test_module(name: str) -> str | None:
    """Return the test module (or conftest, which pytest loads itself) a dotted name is or lies
    in ("tests.test_routes.build_app")."""
    parts = name.split(".")
    for end in range(2, len(parts) + 1):
        is_test_file = ROOT.joinpath(*parts[:end]).with_suffix(".py").is_file()
        stem = parts[end - 1]
        if (
            parts[0] == "tests"
            and (stem.startswith("test_") or stem == "conftest")
            and is_test_file
        ):
            return ".".join(parts[:end])
    return None


def test_no_module_imports_a_test_module() -> None:
    """Tests, their helpers and the benchmarks share helper modules, never a test module."""
    wrong = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        package = module_name(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
        for line, name in absolute_imports(path.read_text(), package):
            imported = owning_test_module(name)
            if imported is not None:
                wrong.add(f"{path.relative_to(ROOT)}:{line}: imports {imported}")
    assert sorted(wrong) == []


@pytest.mark.parametrize(
    ("package", "statement", "expected"),
    [
        ("tests", "import tests.test_routes", "tests.test_routes"),
        ("tests", "from tests import test_routes", "tests.test_routes"),
        ("tests", "from tests.test_routes import build_app", "tests.test_routes"),
        ("tests", "from .test_routes import build_app", "tests.test_routes"),
        ("tests.integration", "from ..test_routes import build_app", "tests.test_routes"),
        ("tests.integration", "from . import test_serve", "tests.integration.test_serve"),
        ("tests", "from tests.integration.conftest import start", "tests.integration.conftest"),
        ("tests", "from tests.fake_ews import FakeExchange", None),
    ],
)
def test_the_checker_sees_a_test_module_imported_in_any_spelling(
    package: str, statement: str, expected: str | None
) -> None:
    imported = {owning_test_module(name) for _line, name in absolute_imports(statement, package)}
    assert imported - {None} == ({expected} if expected else set())
