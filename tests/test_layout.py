"""The package layout: imports run one way (network <- checkpoints <- data <- training; network <- checkpoints <-
inference <- evaluation; the export wrappers import the network alone; runtime, the CPU facts and the timing rule
that inference and training both choose by, imports nothing), no module imports one that imports it back, and no
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
    "runtime": set(),
    "checkpoints": {"model"},
    "hf_export": {"model", "checkpoints"},  # only hf_model.py and processing_minimind_v.py ship: model/ only
    "data_pipeline": {"model", "checkpoints"},
    "inference": {"model", "checkpoints", "data_pipeline", "runtime"},
    "evaluation": {"model", "checkpoints", "data_pipeline", "inference", "runtime"},
    "trainer": {"model", "checkpoints", "data_pipeline", "evaluation", "runtime"},
}
PACKAGES = set(ALLOWED)
MODEL_MAX_LINES = 1700  # both generations (v1 and 3v)
MAX_MODULE_LINES = 400


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved against its package; an
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                is_module = (root / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (root / sub.replace(".", "/") / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else module))
    return found


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in the file, relative ones resolved."""
    return [(line, name.split(".")[0]) for line, name in imported_modules(path, root)
            if name.split(".")[0] in PACKAGES]


def package_modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def module_cycles(root: Path = ROOT) -> list[list[str]]:
    """Every cycle in the graph of project modules (package modules, root scripts, scripts/, bench/), each as the
    list of modules around it; a module counts as importing its packages' __init__ too only when it names them."""
    files = package_modules(root) + sorted(root.glob("*.py")) + sorted((root / "scripts").glob("*.py")) + \
        sorted((root / "bench").glob("*.py"))
    names = {module_name(f, root): f for f in files if f.exists()}
    graph = {name: {m for _, m in imported_modules(f, root) if m in names and m != name} for name, f in names.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_every_package_exists_and_says_what_it_holds():
    for pkg in PACKAGES:
        init = ROOT / pkg / "__init__.py"
        assert init.exists(), pkg
        assert ast.get_docstring(ast.parse(init.read_text())), f"{pkg}/__init__.py has no docstring"


def test_no_module_imports_one_that_imports_it_back():
    assert module_cycles() == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    # a mutation: two modules of one package importing each other, one of them lazily inside a function
    (tmp_path / "inference" / "cpu").mkdir(parents=True)
    for init in ("inference/__init__.py", "inference/cpu/__init__.py"):
        (tmp_path / init).write_text('"""pkg"""\n')
    (tmp_path / "inference" / "cpu" / "a.py").write_text("from .b import f\n")
    (tmp_path / "inference" / "cpu" / "b.py").write_text("def f():\n    from inference.cpu import a\n")
    assert module_cycles(tmp_path) == [["inference.cpu.a", "inference.cpu.b", "inference.cpu.a"]]


def test_model_is_the_network_only():
    """model/ imports nothing else from the project and stays short enough to read in one sitting."""
    total = sum(len(p.read_text().splitlines()) for p in (ROOT / "model").glob("*.py"))
    assert total <= MODEL_MAX_LINES, f"model/ has {total} lines (limit {MODEL_MAX_LINES})"


def test_the_layout_test_sees_a_project_import_from_model(tmp_path):
    # a mutation: a network module importing the checkpoints package is refused
    (tmp_path / "model").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "files.py").write_text("")
    bad = tmp_path / "model" / "vlm.py"
    bad.write_text("from checkpoints.files import atomic_write\n")
    assert [t for _, t in project_imports(bad, tmp_path) if t not in ALLOWED["model"] | {"model"}] == ["checkpoints"]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    package = path.relative_to(ROOT).parts[0]
    wrong = [f"line {line}: imports {target}" for line, target in project_imports(path)
             if target != package and target not in ALLOWED[package]]
    assert not wrong, f"{package}/{path.name} may import only {sorted(ALLOWED[package]) or 'nothing'}: {wrong}"


def test_the_layout_test_sees_a_wrong_import(tmp_path):
    # The check itself must be able to fail: a network module importing the trainer is caught.
    bad = tmp_path / "model" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from trainer.loop import main\nfrom . import config\nimport inference.chat\n")
    assert project_imports(bad, tmp_path) == [(1, "trainer"), (2, "model"), (3, "inference")]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
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


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_too_long(path):
    assert not long_functions(path), f"{path.relative_to(ROOT)}: {long_functions(path)}"
