"""The package's shape, for refactors: the largest files and functions, and the import circles between modules.

    python scripts/structure.py                 # this tree's beacon_peft/ and recipes/
    python scripts/structure.py --root DIR      # another checkout (e.g. a git worktree of an older commit)

An import is any ``import``/``from ... import`` naming a module of the package, at module level or inside a
function (a function-level import hides a circle from Python but not from a reader). A circle is a strongly
connected component of that graph with more than one module; ``tests/test_structure.py`` keeps the package free of
them. Only the standard library is used, so it runs on any checkout without installing it.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = "beacon_peft"


def module_name(path: Path, root: Path) -> str:
    """``beacon_peft/training/readback/loop.py`` -> ``beacon_peft.training.readback.loop`` (packages: no __init__)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (absolute or relative, anywhere in the file)."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` runs pkg/__init__.py
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a name inside a module: that module
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, over every ``.py`` file of the package under ``root``."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, root, modules) for f in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted by first name."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def largest_functions(root: Path, folders: tuple[str, ...], n: int) -> list[tuple[int, str]]:
    """The ``n`` longest functions (lines, ``file:function``) in ``folders`` under ``root``."""
    sizes = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sizes.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def largest_files(root: Path, folders: tuple[str, ...], n: int) -> list[tuple[int, str]]:
    """The ``n`` longest ``.py`` files (lines, path) in ``folders`` under ``root``."""
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(root)))
             for folder in folders for p in (root / folder).rglob("*.py")]
    return sorted(sizes, reverse=True)[:n]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    folders = ("beacon_peft", "recipes")
    print("largest files:", ", ".join(f"{p} {n}" for n, p in largest_files(args.root, folders, args.top)))
    print("largest functions:", ", ".join(f"{p} {n}" for n, p in largest_functions(args.root, folders, args.top)))
    found = circles(import_graph(args.root))
    print(f"import circles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in component))


if __name__ == "__main__":
    main()
