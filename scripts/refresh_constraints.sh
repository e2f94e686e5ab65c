#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions of every package that `pip install -e ".[test]"`
# resolves to (newest allowed by pyproject.toml; torch/torchvision stay <= 2.14.1 / 0.29.1,
# the releases on the reference machines' disk), for Linux x86_64, Python 3.11. Then
# scripts/check_newest.sh installs those newest versions in a scratch environment and runs the
# quick tests, so a drifted package shows up here, not on a user's machine.
#
#   scripts/refresh_constraints.sh            # re-resolve + quick tests on the newest versions
#   scripts/refresh_constraints.sh --no-check # re-resolve only
#
# Needs uv (`pip install uv`). After it: review `git diff constraints.txt`, run the whole suite
# installed through the new file (README, command 2), commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null; then UV=(uv); else UV=(python -m uv); fi
"${UV[@]}" pip compile pyproject.toml --extra test --upgrade \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "scripts/refresh_constraints.sh" -o constraints.txt >/dev/null
if [[ "${1:-}" != "--no-check" ]]; then
    scripts/check_newest.sh
fi
