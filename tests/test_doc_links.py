"""Every relative link in README.md and docs/*.md resolves (file and heading anchor)."""
from __future__ import annotations

import runpy

from conftest import PROJECT_ROOT


def test_readme_and_docs_links_resolve():
    check = runpy.run_path(str(PROJECT_ROOT / "scripts" / "check_doc_links.py"))
    assert check["broken_links"](PROJECT_ROOT) == []
