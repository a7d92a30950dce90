#!/usr/bin/env bash
# benchmarks.efficiency on a machine where this package is not installed and nothing can be downloaded (the
# lent GPU): its python has torch, but neither the package's entry points (through which the built-in
# strategies register) nor transformers 5.24. So: install the wheels carried in .whl/ (if any) and the
# package itself (built offline, from a copy of the tree, with the machine's setuptools) into a private
# folder, put it on PYTHONPATH behind the tree, and run the benchmark with this script's arguments.
#
#   bash benchmarks/device_run.sh --device cuda --stop-after 420 --profile none,fastv:192,sparsevlm:192 \
#       --out "$OUT/efficiency_cuda" 2>&1 | tee "$OUT/efficiency_cuda.log"
#
# PYTHON (default python3) and SITE (default /tmp/sparsevlm-site) override the interpreter and the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=${SITE:-/tmp/sparsevlm-site}

shopt -s nullglob
wheels=(.whl/*.whl)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
# a copy, so that the build's build/ and *.egg-info stay out of the tree: what pyproject.toml builds (its
# packages; README.md is its readme)
cp -r pyproject.toml README.md framework strategies models experiments "$src"/
"$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation --no-compile \
    --upgrade --target "$site" "${wheels[@]}" "$src"

export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__} from {transformers.__file__}")'
exec "$python" -m benchmarks.efficiency "$@"
