"""The code's shape (issue #16): no function in ``src/`` over ~80 lines without a reason beside it.

A longer function carries a comment starting ``# long:`` right above its ``def`` (or its
decorators) saying why it stays in one piece, e.g. a training loop read top to bottom.
"""
from __future__ import annotations

import ast

from conftest import PROJECT_ROOT

MAX_LINES = 80


def _reason_above(lines: list[str], first: int) -> bool:
    """A ``# long:`` line in the comment block just above line ``first`` (1-based)."""
    i = first - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        if lines[i].lstrip().startswith("# long:"):
            return True
        i -= 1
    return False


def test_no_long_function_without_a_written_reason():
    unexplained = []
    for path in sorted((PROJECT_ROOT / "src").rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if length > MAX_LINES and not _reason_above(lines, first):
                    unexplained.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not unexplained, "shorten these or write '# long: <why>' above them:\n" + "\n".join(unexplained)
