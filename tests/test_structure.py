"""The house stays livable (docs/decisions/0016-structure.md): no function over 60 lines,
half of them under 10, no module over 600 lines; generated code aside."""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

from harness import ROOT

SOURCES = [
    path
    for root in ("server", "client")
    for path in sorted((ROOT / root).rglob("*.py"))
    if "chronoplane/v1" not in path.as_posix()
]


def _functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno
    ]


def test_functions_are_short() -> None:
    sizes = [size for path in SOURCES for size in _functions(path)]
    long = sorted((size, name) for size, name in sizes if size > 60)
    assert not long, f"functions over 60 lines: {long}"
    assert statistics.median(size for size, _ in sizes) < 10


def test_modules_are_not_too_big() -> None:
    big = {
        str(path.relative_to(ROOT)): lines
        for path in SOURCES
        if (lines := len(path.read_text().splitlines())) > 600
    }
    assert not big, f"modules over 600 lines (split them, or say at the top why not): {big}"
