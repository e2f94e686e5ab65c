"""Check every relative Markdown link in README.md and docs/*.md: the file exists and, for
``file.md#anchor``, the anchor is one of that file's headings (GitHub's heading slugs).

    python scripts/check_doc_links.py        # prints the broken links, exits 1 if any
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fence = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
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


def broken_links(root: Path = ROOT) -> list[str]:
    broken = []
    for md in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in _prose(md))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(root)}: no file {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(root)}: no heading for {target}")
    return broken


if __name__ == "__main__":
    problems = broken_links()
    print("\n".join(problems) or "all relative links in README.md and docs/*.md resolve")
    sys.exit(1 if problems else 0)
