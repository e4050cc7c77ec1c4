#!/usr/bin/env bash
# One GPU check, run on a lent CUDA machine in one call (well under 8 minutes):
#   1. the `gpu`-marked tests (Triton kernels on the real device, hardware paths),
#   2. the CUDA benchmarks (bench/ with device="cuda"), tables appended to $OUT/BENCHMARKS-gpu.md.
# Logs and tables go to $OUT when it is set (the device tool copies them back), else to ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
if ! command -v uv >/dev/null 2>&1; then python3 -m pip install -q uv; fi
timeout 150 uv sync --locked > "$out/sync.log" 2>&1 || { echo "uv sync failed"; tail -20 "$out/sync.log"; exit 1; }
status=0
timeout 200 uv run pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 180 uv run python -m bench run cuda --append "$out/BENCHMARKS-gpu.md" 2>&1 \
  | tee "$out/bench-gpu.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check exit status: $status (logs in $out)"
exit $status
