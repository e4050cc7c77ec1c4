#!/usr/bin/env bash
# Packaging check: every distribution builds a wheel (`uv build --package NAME`), and `mxfp8train` (which
# depends on shared-kernels) installs alone into a fresh virtual environment from those local sources with
# its dependencies resolved from the package index (uv's pip interface; the same resolution pip does, but the
# multi-GB torch wheel comes from uv's cache instead of being downloaded again), then imports and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for pkg in shared-kernels siattn nf4lora mxfp8train idiomreason rerankdistill rerank-qlora lm-pretrain idiom-sweep; do
  uv build -q --package "$pkg" --wheel -o "$tmp/dist"
done
ls "$tmp/dist"
uv venv -q --python 3.11 "$tmp/venv"
VIRTUAL_ENV="$tmp/venv" uv pip install -q --no-sources ./shared-kernels ./packages/mxfp8train
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import importlib.metadata as md
import mxfp8train, shared_kernels
for dist in ("mxfp8train", "shared-kernels"):
    print(dist, md.version(dist))
assert "site-packages" in mxfp8train.__file__ and "site-packages" in shared_kernels.__file__, (mxfp8train.__file__, shared_kernels.__file__)
print("standalone install OK:", mxfp8train.__file__)
PY
