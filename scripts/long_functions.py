"""Print loralab's functions longer than a limit (default 80 lines), longest first.

    python scripts/long_functions.py [LIMIT]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "loralab"


def functions(limit: int) -> list[tuple[int, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def main(argv: list[str]) -> int:
    limit = int(argv[0]) if argv else 80
    found = functions(limit)
    for n, where in found:
        print(f"{n:4d} {where}")
    print(f"{len(found)} function(s) over {limit} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
