"""Check every relative Markdown link in README.md, CHANGELOG.md and docs/**/*.md.

A relative link must name a file or folder inside the repository (a link that leaves it, such
as ``../shared/...`` or an absolute path, is an error), and ``file.md#anchor`` (or ``#anchor``
on the same page) must be one of that file's headings, as GitHub makes their anchors. Web
links (``https:``, ``mailto:``) are not followed. The pages that code, configuration and tests
name (``docs/evaluation.md#arms`` in a comment, a docstring or a message) must exist too, with
their anchors.

    python scripts/check_doc_links.py        # prints the broken links, exits 1 if any
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")   # [text](target "title")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")  # [label]: target
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
WEB = ("http:", "https:", "mailto:")
CODE_DIRS = ("src", "conf", "tests", "scripts", "benchmarks", "notebooks")
CODE_SUFFIXES = {".py", ".yml", ".yaml", ".sh", ".ipynb", ".toml", ".j2", ".md"}
CODE_REFERENCE = re.compile(r"(?<![\w/.-])((?:docs/[\w./-]*[\w-]\.md|README\.md|CHANGELOG\.md)(?:#[\w-]+)?)")


def _prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fence = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path`` (lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` ... for repeated headings)."""
    out, seen = set(), {}
    for line in _prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, CHANGELOG.md (where present) and every Markdown file under docs/."""
    top = [root / name for name in ("README.md", "CHANGELOG.md") if (root / name).exists()]
    return top + sorted((root / "docs").rglob("*.md"))


def links(md: Path) -> list[str]:
    """Every link target of ``md`` outside code (fenced blocks and inline code)."""
    targets = []
    for line in _prose(md):
        line = re.sub(r"`[^`]*`", "", line)
        ref = REFERENCE.match(line)
        targets += [ref.group(1)] if ref else INLINE.findall(line)
    return targets


def code_references(root: Path = ROOT) -> list[tuple[Path, str]]:
    """Every ``docs/<page>.md[#anchor]``, ``README.md`` or ``CHANGELOG.md`` named in the code,
    configuration, tests, scripts, benchmarks and notebooks (paths from the repository root)."""
    refs = []
    files = [root / "pyproject.toml", *(f for d in CODE_DIRS for f in sorted((root / d).rglob("*")))]
    for f in files:
        if (f.is_file() and f.suffix in CODE_SUFFIXES and "__pycache__" not in f.parts
                and f.name != Path(__file__).name):  # this script's own examples
            refs += [(f, m) for m in CODE_REFERENCE.findall(f.read_text(errors="replace"))]
    return refs


def broken_links(root: Path = ROOT) -> list[str]:
    root = root.resolve()
    broken = []
    for f, target in code_references(root):
        path, _, anchor = target.partition("#")
        if not (root / path).exists():
            broken.append(f"{f.relative_to(root)}: names {target}, which does not exist")
        elif anchor and anchor not in anchors(root / path):
            broken.append(f"{f.relative_to(root)}: names {target}, which has no such heading")
    for md in doc_files(root):
        where = md.relative_to(root)
        for target in links(md):
            if target.lower().startswith(WEB):
                continue
            if SCHEME.match(target) or target.startswith("/"):
                broken.append(f"{where}: not a relative link inside the repository: {target}")
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if dest != root and root not in dest.parents:
                broken.append(f"{where}: link leaves the repository: {target}")
            elif not dest.exists():
                broken.append(f"{where}: no file {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading for {target}")
    return broken


if __name__ == "__main__":
    problems = broken_links()
    print("\n".join(problems) or "all relative links in README.md, CHANGELOG.md and docs/**/*.md resolve,"
          " and every page the code names exists")
    sys.exit(1 if problems else 0)
