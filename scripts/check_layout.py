"""Import circles and file sizes of the packages (issue 17): `python scripts/check_layout.py`.

An import of a.b.c (at module level, or inside a function: both count) runs a/__init__,
a/b/__init__ and a/b/c, so it is an edge to each of them, but for the importer's own
packages, which are initialised before it: an edge to one of those only where it takes
names that package's __init__ defines. Prints every cycle of module
imports among store_service, model_worker and cluster, and every source file over its
line limit; exits 1 if there is either."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("store_service", "model_worker", "cluster")
LIMIT, KERNEL_LIMIT = 500, 700


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` whose code importing `path` needs to have run."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    direct: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            direct |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # a submodule, or a name the module `base` defines (its code must have run)
            direct |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    parents = {".".join(t.split(".")[:i]) for t in direct for i in range(1, t.count(".") + 1)}
    return ((direct | (parents - ancestors)) & modules) - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    files = [p for pkg in PACKAGES for p in Path(pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports(p, modules) for p in files}
    found = cycles(graph)
    for c in found:
        print("import circle:", " <-> ".join(c))
    big = []
    for p in files:
        n = len(p.read_text().splitlines())
        limit = KERNEL_LIMIT if "kernels" in p.parts else LIMIT
        if n > limit:
            big.append(p)
            print(f"over {limit} lines: {p} ({n})")
    print(f"{len(files)} files, {sum(len(v) for v in graph.values())} imports: "
          f"{len(found)} circles, {len(big)} files over their limit")
    return 1 if found or big else 0


if __name__ == "__main__":
    sys.exit(main())
