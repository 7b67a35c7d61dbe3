#!/usr/bin/env bash
# Set up (idempotent) and run the demo: embedded broker, sample videos, one worker, captions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/captionflow" demo "$@"
