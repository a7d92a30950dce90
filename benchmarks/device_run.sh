#!/usr/bin/env bash
# benchmarks.efficiency on a machine where this package is not installed and nothing can be downloaded (the
# lent GPU): its python has torch, but neither the package's entry points (through which the built-in
# strategies register) nor transformers 5.24. So: install the wheels carried in .whl/ (if any) into a private
# folder, write the package's metadata there (its name, version and entry points, read from pyproject.toml:
# the code itself is imported from the tree, so nothing is built and no build backend is needed), put the
# tree and the folder on PYTHONPATH, and run the benchmark with this script's arguments.
#
# Fill .whl/ (git ignores it) on a machine that can reach an index, then carry it along:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 transformers==5.24.0 -d .whl
# (--python-version is the target machine's python; the lent GPU's image already has transformers' own needs,
# huggingface_hub, tokenizers, safetensors, regex, and this package's einops and pillow.)
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
if ((${#wheels[@]})); then
    "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$site" "${wheels[@]}"
fi
"$python" - "$site" <<'PY'
import pathlib, sys, tomllib

project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"{project['name']}-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
sections = (
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
    for group, points in groups.items()
    if points
)
(info / "entry_points.txt").write_text("\n".join(sections))
PY

export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__} from {transformers.__file__}")'
exec "$python" -m benchmarks.efficiency "$@"
