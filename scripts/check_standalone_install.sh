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
SHARED_KERNELS_CACHE="$tmp/kernel-cache" "$tmp/venv/bin/python" - <<'PY'
import importlib.metadata as md
import mxfp8train, shared_kernels
for dist in ("mxfp8train", "shared-kernels"):
    print(dist, md.version(dist))
assert "site-packages" in mxfp8train.__file__ and "site-packages" in shared_kernels.__file__, (mxfp8train.__file__, shared_kernels.__file__)
# the native CPU kernels' C sources ship in the wheel and compile from there (a fresh cache)
import torch
from shared_kernels import mx_cpu, nf4_cpu
from shared_kernels.mx_cast import mx_cast, mx_cast_ref
assert mx_cpu.available() and nf4_cpu.available(), "native CPU kernels did not build from the wheel"
x = torch.randn(64, 96)
assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(mx_cast(x), mx_cast_ref(x)))
assert mx_cpu.op_available(), "the MX casts' C++ op (mx_cpu_op.cpp) did not build from the wheel"
print("standalone install OK:", mxfp8train.__file__)
PY

# A torch-free package stays torch-free: idiomreason's core (with shared-kernels' torch-free modules: errors,
# text files, redaction, the locked append-only store) installs without torch and parses an answer.
uv venv -q --python 3.11 "$tmp/venv-notorch"
cd "$OLDPWD"
VIRTUAL_ENV="$tmp/venv-notorch" uv pip install -q --no-sources ./shared-kernels ./packages/idiomreason
cd "$tmp"
"$tmp/venv-notorch/bin/python" - <<'PY'
import importlib.util, sys
import idiomreason.cli, idiomreason.store, shared_kernels.runconfig
from idiomreason.parsing import extract_label
assert importlib.util.find_spec("torch") is None, "torch was installed with idiomreason's core"
assert "torch" not in sys.modules
print("torch-free install OK:", idiomreason.__file__, extract_label("Answer: literal"))
PY
