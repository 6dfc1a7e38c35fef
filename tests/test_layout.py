"""The package layout: imports run one way (network <- data <- training; network <- inference <- apps), and no
module grows past what a reader takes in at one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project (besides itself). Root scripts, scripts/ and bench/ are the apps
# and may import anything.
ALLOWED = {
    "model": set(),
    "data_pipeline": {"model"},
    "trainer": {"model", "data_pipeline"},
    "inference": {"model", "data_pipeline"},
}
PACKAGES = set(ALLOWED)
MAX_MODULE_LINES = 400


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in the file, relative ones resolved."""
    package = path.parent.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package if node.level else (node.module or "")]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PACKAGES]
    return found


def package_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py"))


def test_every_package_exists_and_says_what_it_holds():
    for pkg in PACKAGES:
        init = ROOT / pkg / "__init__.py"
        assert init.exists(), pkg
        assert ast.get_docstring(ast.parse(init.read_text())), f"{pkg}/__init__.py has no docstring"


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports_run_one_way(path):
    package = path.parent.name
    wrong = [f"line {line}: imports {target}" for line, target in project_imports(path)
             if target != package and target not in ALLOWED[package]]
    assert not wrong, f"{package}/{path.name} may import only {sorted(ALLOWED[package]) or 'nothing'}: {wrong}"


def test_the_layout_test_sees_a_wrong_import(tmp_path):
    # The check itself must be able to fail: a network module importing the trainer is caught.
    bad = tmp_path / "model" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from trainer.loop import main\nfrom . import config\nimport inference.chat\n")
    assert project_imports(bad) == [(1, "trainer"), (2, "model"), (3, "inference")]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_MODULE_LINES})"


def test_no_code_among_the_users_data():
    assert not list((ROOT / "dataset").rglob("*.py")), "dataset/ holds the user's data, not code"


MAX_FUNCTION_LINES = 60


def long_functions(path: Path) -> list[str]:
    """Functions and methods of the file longer than MAX_FUNCTION_LINES (docstring included)."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_function_is_too_long(path):
    assert not long_functions(path), f"{path.relative_to(ROOT)}: {long_functions(path)}"
