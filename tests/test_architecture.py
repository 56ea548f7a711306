"""The package's shape, checked: what `lint-imports` does not (cycles, size, the root).

The layer contract itself (cli > stages > project > nested > text > errors, version)
is import-linter's, run by `make test` and `.ci/run`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "nsn_cli"
MAX_LINES = 300  # "modules under ~300 lines" (HELPERS.md)


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_nothing_inside_imports_the_package_root():
    """`nsn_cli/__init__.py` is the public API, loaded lazily; inside, imports name modules."""
    offenders = []
    for path in modules():
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "nsn_cli":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} (relative)")
            elif isinstance(node, ast.Import) and any(a.name == "nsn_cli" for a in node.names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_no_import_cycles():
    """No module reaches itself through imports, lazy (in-function) ones included.

    Imports only for type checking are left out: they never run.
    """
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("nsn_cli", exclude_type_checking_imports=True, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                cycles.append(" -> ".join((module,) + tuple(chain)))
    assert not cycles, cycles


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for p in modules()}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_top_level_help_answers_without_torch():
    """`nsn --help` (the entry point's own help, not a command's) never loads torch."""
    code = ("import sys\nfrom nsn_cli.cli.app import main\nsys.argv = ['nsn', '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code or 0, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "100"}, cwd=REPO)
    lines = out.stdout.split("\n")
    assert "convert" in out.stdout and "profile" in out.stdout  # it printed the commands
    assert lines[-2].split() == ["0", "False"]


@pytest.mark.parametrize("spelling, home", [
    ("splitlines()[0]", "nsn_cli/errors.py"),  # errors.first_line (empty messages!)
    ("_nsn_", "nsn_cli/nested/state.py"),  # the one NestedState, through nested_state()
    ("was_training", "nsn_cli/nested/layer.py"),  # nested.layer.evaluating
])
def test_concepts_defined_once_are_not_spelled_again(spelling, home):
    """A new copy of one of these drifts from the original, as the old copies did."""
    found = [str(p.relative_to(REPO)) for p in modules()
             if spelling in p.read_text(encoding="utf-8")]
    assert found == [home]
