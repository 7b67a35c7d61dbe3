#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, then print the 15 slowest tests (so
# that a suite that grows slower shows it). Extra arguments go to pytest, after ours.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest --durations=15 "$@"
