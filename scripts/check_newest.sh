#!/usr/bin/env bash
# The quick tests on the *newest* versions pyproject.toml allows (no constraints.txt), in a
# scratch virtual environment: finds drift (a new release that breaks the project) when
# constraints.txt is refreshed (scripts/refresh_constraints.sh runs this), not on a user's
# machine. Exit status: pytest's. The scratch environment (a few GB: torch) is removed at the
# end unless KEEP_VENV=1.
#
#   scripts/check_newest.sh                 # python3.11 -m venv in a temp dir, pip install -e ".[test]", quick tests
#   PYTHON=python3.12 scripts/check_newest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d "${TMPDIR:-/tmp}/fu_kedro_newest.XXXXXX")
[[ "${KEEP_VENV:-0}" == 1 ]] || trap 'rm -rf "$scratch"' EXIT
"${PYTHON:-python3.11}" -m venv "$scratch/venv"
unset PYTHONPATH VIRTUAL_ENV
PATH="$scratch/venv/bin:$PATH"
python -m pip install -q --upgrade pip
python -m pip install -e ".[test]"
python -m pip freeze --exclude-editable > "$scratch/newest.txt"
# what differs from the pinned set (constraints.txt), for the record
python - "$scratch/newest.txt" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = lambda f: {norm(a): b for a, b in (l.split("#")[0].strip().split("==", 1) for l in open(f) if "==" in l.split("#")[0])}
new, locked = pins(sys.argv[1]), pins("constraints.txt")
diff = sorted((k, locked.get(k), new.get(k)) for k in set(new) | set(locked) if k in new and locked.get(k) != new[k])
print(f"newest vs constraints.txt: {len(diff)} package(s) differ" + "".join(f"\n  {k}: {a} -> {b}" for k, a, b in diff))
PY
set +e
python -m pytest -m "not slow" -p no:cacheprovider
status=$?
echo "check_newest: pytest exit $status (scratch environment: $scratch/venv)"
exit $status
