#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite in two processes (pytest-xdist; a module's
# tests stay in one process, see tests/conftest.py), then print the 15 slowest tests (so
# that a suite that grows slower shows it). Extra arguments go to pytest, after ours
# (`-n 0` runs everything in this process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -n 2 --dist loadscope --durations=15 "$@"
