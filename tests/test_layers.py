"""The package's layers, checked from the source (every import counts, those inside functions too).

    modeling/   runtime: attention kernels, MMCA, the hosted classes   imports nothing of kvslim
    convert/    I/O, adapters, records, methods, the layerwise driver  may import modeling/
    recipes/    evaluate, inspect, report, publish, uptrain            may import both
    cli.py      the command line                                       may import everything

plus: no import cycle between modules, no private name imported from another module, no global
matplotlib backend chosen by library code, and `import kvslim` / `kvslim --help` load no
Transformers model implementation.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling", "convert", "recipes")
ALLOWED = {"modeling": set(), "convert": {"modeling"}, "recipes": {"modeling", "convert"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["kvslim", *parts])


def _sources() -> dict[str, Path]:
    files = [ROOT / "cli.py", ROOT / "compat.py", ROOT / "__init__.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return {_module_name(f): f for f in files}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported kvslim module, names taken from it, line) for every import in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "kvslim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "kvslim":
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _resolve(target: str, names: list[str], modules: dict) -> list[str]:
    """The modules an import really loads: `from kvslim.convert import gqa` loads kvslim.convert.gqa."""
    out = [target] if target in modules else []
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return out


def _graph():
    modules = _sources()
    edges = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(name, path):
            edges[name].update(t for t in _resolve(target, names, modules) if t != name)
    return modules, edges


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else None


def test_each_layer_imports_only_the_layers_below_it():
    _, edges = _graph()
    wrong = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
             if _package(a) and _package(b) and _package(a) != _package(b)
             and _package(b) not in ALLOWED[_package(a)]]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    _, edges = _graph()
    # a package's __init__ re-exports its modules: the edge from a module to its own package's
    # __init__ is the only kind allowed to close a loop
    def deps(m):
        return {t for t in edges[m] if not (m.startswith(t + ".") and _package(t) == _package(m))}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in deps(m):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_from_another_module():
    modules = _sources()
    wrong = [f"{name}:{line} imports {n} from {target}"
             for name, path in modules.items() for target, names, line in _imports(name, path)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


def test_library_code_sets_no_global_matplotlib_backend():
    offenders = [str(p) for p in _sources().values() if "matplotlib.use(" in p.read_text()]
    assert not offenders


@pytest.mark.parametrize("entry", ["import kvslim", "kvslim --help"])
def test_entry_points_load_no_transformers_model_implementation(entry):
    code = ("import sys, json\n"
            + ("import kvslim\n" if entry == "import kvslim" else
               "from typer.testing import CliRunner\nfrom kvslim.cli import app\n"
               "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n")
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('transformers.models.') "
              "and '.modeling_' in m)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
