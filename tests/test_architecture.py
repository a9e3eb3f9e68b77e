"""The package's layering, checked from the source: which subpackage may import which, and no import cycles.

Every ``import``/``from ... import`` counts, also those inside functions (a lazy import is still a
dependency). Layers, bottom to top:

- the base modules (``errors``, ``defaults``, ``files``, ``machine``): import nothing of the package
  but each other;
- ``native``: the modules that own llama.cpp's C handles (``engine.llama``, ``engine.native``); the
  base only (the converter quantizes through them, so they sit below it);
- ``convert`` and ``formats``: the base (and ``native`` for ``convert``);
- ``models``: the base and ``convert``;
- ``engine``: the base, ``native``, ``convert``'s GGUF reader and ``models``;
- ``run``: everything below it;
- ``bench``: everything below it; ``cli`` (and ``__main__``): anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "capsfuse_lite"
ROOT = Path(__file__).resolve().parents[1]
SOURCES = {PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.convert": ROOT / "convert"}

BASE = {"errors", "defaults", "files", "machine"}
NATIVE = {"engine.llama", "engine.native"}
ALLOWED = {
    "base": {"base"},
    "native": {"base", "native"},
    "convert": {"base", "native", "convert"},
    "formats": {"base", "formats"},
    "models": {"base", "convert", "models"},
    "engine": {"base", "native", "convert", "models", "engine"},
    "run": {"base", "native", "convert", "formats", "models", "engine", "run"},
    "bench": {"base", "native", "convert", "formats", "models", "engine", "run", "bench"},
    "cli": {"base", "native", "convert", "formats", "models", "engine", "run", "bench", "cli"},
}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if path.is_relative_to(ROOT / PACKAGE / "convert"):
                continue  # a source-tree link to convert/, if any
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts[0] in BASE:
        return "base"  # the package's own __init__ imports only errors (the rest lazily, by name)
    if ".".join(parts[:2]) in NATIVE:
        return "native"
    if parts[0] == "__main__":
        return "cli"
    return parts[0]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # ``from pkg import submodule`` depends on the submodule, not on everything in pkg
            names = subs if any(name in known for name in subs) else [base]
        else:
            continue
        for name in names:
            # the longest known module the name falls in (``pkg.mod.attr`` -> ``pkg.mod``)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != PACKAGE:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_import_stays_in_its_layer():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in sorted(graph().items()) for b in sorted(deps)
             if layer(b) not in ALLOWED[layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_the_package():
    g = graph()
    assert f"{PACKAGE}.engine.llama" in g and f"{PACKAGE}.convert.writer" in g
    assert f"{PACKAGE}.engine.llama" in g[f"{PACKAGE}.engine.fuser"]


def test_only_engine_llama_touches_llama_cpp():
    """One module owns llama.cpp's C API. Two others may import llama-cpp-python, for what is not the
    C API: the bench's baseline *is* its high-level ``Llama`` class, and machine.py reads its version."""
    allowed = {f"{PACKAGE}.engine.llama", f"{PACKAGE}.bench.baselines", f"{PACKAGE}.machine"}
    users = set()
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(name == "llama_cpp" or name.startswith("llama_cpp.") for name in names):
                users.add(module)
    assert f"{PACKAGE}.engine.llama" in users
    assert users <= allowed, sorted(users - allowed)
