#!/usr/bin/env bash
# One command on a machine with one CUDA GPU: checks every GPU code path (see docs/deployment.md, section 4).
# Runs from anywhere; arguments are passed on (e.g. --quick, --json out.json).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
