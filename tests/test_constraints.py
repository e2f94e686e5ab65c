"""``constraints.txt`` (scripts/refresh_constraints.sh) pins every requirement of pyproject.toml
(base + ``test`` extra) to one exact version that the requirement allows: a dependency added
without refreshing the file, or a pin outside a new bound, fails here."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_requirement_within_its_bounds():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_norm(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    missing = [str(r) for r in requirements if _norm(r.name) not in pins]
    assert not missing, f"constraints.txt lacks {missing}: run scripts/refresh_constraints.sh"
    outside = [f"{r} (pinned {pins[_norm(r.name)]})" for r in requirements
               if not r.specifier.contains(pins[_norm(r.name)], prereleases=True)]
    assert not outside, f"constraints.txt pins outside pyproject.toml's bounds: {outside}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the releases on local disk
