#!/usr/bin/env bash
# video.decode_device=cuda on an NVIDIA host, as one short run: the decode-device tests
# (NVDEC decoded the frames, and they match the CPU path within codec tolerance), then
# bench/bench_gpu_decode.py (CPU-seconds and wall per clip, GPU against CPU, three classes).
#
# The GPU host reaches no package registry, so its missing wheels travel with the tree:
#   here:   bench/gpu_decode_check.sh --fetch-wheels     # into .gpu-wheels/ (git-ignored)
#   there:  bash bench/gpu_decode_check.sh               # device tool: carry [".gpu-wheels"]
# It uses the host's python3 (PYTHON=...), which must have numpy, psutil, pytest and httpx;
# PyAV, pydantic and orjson come from .gpu-wheels/. Figures go to $OUT (or /tmp).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
wheels="$root/.gpu-wheels"

if [ "${1:-}" = "--fetch-wheels" ]; then
  py_version="${GPU_PYTHON_VERSION:-3.12}"  # the GPU image's python3 (docs/operations.md)
  mkdir -p "$wheels"
  "${PIP:-$root/.venv/bin/pip}" download -q --only-binary=:all: --python-version "$py_version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" \
    av==18.1.0 "pydantic>=2.7,<3" "pydantic-settings>=2.3,<3" orjson
  du -sh "$wheels"
  exit 0
fi

out="${OUT:-/tmp/captionflow-gpu-decode}"
mkdir -p "$out"
site="$(mktemp -d)/site"
"$python" -m pip install -q --no-index --find-links "$wheels" --target "$site" \
  av pydantic pydantic-settings orjson
export PYTHONPATH="$site:$root" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

status=0
# Only the video corpus fixtures: the rest of tests/conftest.py needs Kafka and vLLM, and
# pyproject's pytest settings name pytest-asyncio's options, which that host lacks.
"$python" -m pytest -q -c /dev/null --rootdir "$root" --noconftest -p tests.support.video_fixtures \
  tests/test_video_decode_device.py 2>&1 | tee "$out/gpu_decode_tests.log" || status=1
"$python" bench/bench_gpu_decode.py --repeats "${REPEATS:-3}" --json "$out/gpu_decode.json" \
  2>&1 | tee "$out/gpu_decode_bench.log" || status=1
exit "$status"
