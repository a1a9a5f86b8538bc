"""The package's shape: no import cycle, library names kept behind the hosts, one error base."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import hetvit
from hetvit import errors

PACKAGE = Path(hetvit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file (inside functions too:
    a cycle hidden in a function body is still a cycle)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import io` imports the module hetvit.io, not the package's __init__ alone
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found.update(subs or {target})
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_module_sits_in_the_design_s_layers_and_imports_only_downwards():
    """docs/design.md's layer table is a fact, not a wish: every library module is in one row,
    and imports only modules of its row or of the rows above it."""
    import re

    text = (PACKAGE.parent.parent / "docs" / "design.md").read_text()
    table = text[text.index("## Layers of the package"):text.index("## Hosts")]
    rows = [re.findall(r"`([\w.]+)`", line.split("|")[2]) for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")]
    row_of = {f"hetvit.{m}": k for k, mods in enumerate(rows) for m in mods}
    graph = {m: deps for m, deps in _graph().items()
             if m != "hetvit" and not m.startswith("hetvit.cli") and m != "hetvit.__main__"}
    packages = {"hetvit.hosts", "hetvit.baselines"}  # their __init__ re-exports their modules
    missing = sorted(m for m in graph if m not in row_of and m not in packages
                     and m.rpartition(".")[0] not in {"hetvit.baselines"})
    assert not missing, f"not in docs/design.md's layers: {missing}"
    upward = [f"{m} -> {d}" for m, deps in graph.items() if m in row_of
              for d in deps if d in row_of and row_of[d] > row_of[m]]
    assert not upward, f"imports of a later layer: {upward}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_hosts_and_the_baselines_read_a_models_structure():
    """timm's attribute names (``.blocks``, ``.attn``, ``.qkv``, ``patch_embed``) stay in the
    host adapter; the baselines rewrite timm's Block by design."""
    names = {"blocks", "attn", "qkv", "patch_embed"}
    allowed = {"hetvit.hosts", "hetvit.baselines"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if any(module == a or module.startswith(a + ".") for a in allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names:
                offenders.append(f"{module}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_every_error_class_derives_from_the_one_base():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__]
    assert len(classes) > 5
    assert all(issubclass(c, errors.HetvitError) for c in classes)
    for path in sorted(PACKAGE.rglob("*.py")):  # and no error class is defined elsewhere
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                assert path.name == "errors.py" or any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith("Error") for b in node.bases
                ), f"{path.name}: {node.name} is not a hetvit error"


def test_the_top_level_api_is_small_and_every_name_resolves():
    import subprocess
    import sys

    names = [n for n in hetvit.__all__ if n != "__version__"]
    assert len(names) <= 14  # the common path; the rest lives in the submodules
    for name in names:  # a function, not a module of the same name shadowing it
        assert not inspect.ismodule(getattr(hetvit, name)), name
    assert set(hetvit.__all__) <= set(dir(hetvit))
    # `import hetvit` and `hetvit --help` (which imports the CLI) stay light: no torch
    code = "import sys, hetvit, hetvit.cli; hetvit.Plan(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_submodule_is_reachable_after_a_plain_import():
    """``hetvit.NAME`` loads any library module on first use (the CLI aside), new ones too."""
    import subprocess
    import sys

    modules = sorted(p.stem if p.name != "__init__.py" else p.parent.name
                     for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/__init__.py")]
                     if p.stem not in ("__init__", "__main__") or p.parent != PACKAGE)
    modules = [m for m in modules if m != "cli"]
    code = ("import hetvit, sys; names = sys.argv[1:]; "
            "print(all(getattr(hetvit, n).__name__ == 'hetvit.' + n for n in names))")
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True", out.stderr
    assert "views" in modules and "bench_results" in modules and set(modules) <= set(dir(hetvit))


def test_every_hetvit_name_the_benchmarks_import_exists():
    """The benchmarks are scripts no test runs; a renamed module or function must still fail
    here rather than at the start of a half-hour measurement."""
    import importlib.util

    missing = []
    for script in sorted((PACKAGE.parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hetvit"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not (
                                hasattr(module, "__path__")  # a package: maybe a submodule
                                and importlib.util.find_spec(f"{node.module}.{a.name}"))]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("hetvit") and importlib.util.find_spec(a.name) is None:
                        missing.append(f"{script.name}: {a.name}")
    assert not missing, missing
