"""Print loralab's import circles: every import between loralab's own modules counts, those inside
functions too (a lazy import still ties two modules together).

    python scripts/import_graph.py            # the circles, one per line; exit 1 if any
    python scripts/import_graph.py --edges    # every edge, "a -> b"
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "loralab"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def edges() -> dict[str, set[str]]:
    """module -> the loralab modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    out: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    out[mod].add(t)
    # A package's __init__ re-exporting its modules is not a circle of the code that uses them.
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main(argv: list[str]) -> int:
    graph = edges()
    graph = {m: {t for t in ts if t != PACKAGE} for m, ts in graph.items()}  # `from loralab import x`: the API
    if "--edges" in argv:
        for m in sorted(graph):
            for t in sorted(graph[m]):
                print(f"{m} -> {t}")
        return 0
    found = circles(graph)
    for comp in found:
        print("circle: " + " <-> ".join(comp))
    print(f"{len(found)} import circle(s) among {len(graph)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
