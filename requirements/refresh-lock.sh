#!/usr/bin/env bash
# Refresh requirements/ci.lock: the exact versions CI installs (as pip constraints), resolved with
# uv from pyproject.toml's ranges and extras, newest the registry serves today.
#
#   pip install uv && bash requirements/refresh-lock.sh && CI=true bash .ci/run
#
# torch is kept out of the resolution and pinned by hand: its PyPI metadata drags in the CUDA
# stack (nvidia-*, cuda-*), while CI (and this machine) installs the CPU wheel torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
override=$(mktemp)
trap 'rm -f "$override"' EXIT
echo "torch==$TORCH ; sys_platform == 'never'" > "$override"  # never true: torch leaves the resolution
uv pip compile pyproject.toml requirements/ci.in \
  --extra dev --extra semantic --extra kernels --extra plot \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --override "$override" --no-header --no-annotate -q -o requirements/ci.lock.tmp
{
  echo "# Constraints CI installs with (pip install -c requirements/ci.lock ...); made by"
  echo "# requirements/refresh-lock.sh on $(date -u +%Y-%m-%d). Users install from pyproject's ranges."
  echo "torch==$TORCH"
  cat requirements/ci.lock.tmp
} > requirements/ci.lock
rm requirements/ci.lock.tmp
echo "wrote requirements/ci.lock ($(grep -c '==' requirements/ci.lock) pins)"
