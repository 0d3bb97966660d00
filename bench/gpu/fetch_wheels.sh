#!/usr/bin/env bash
# Download (from PyPI) the wheels bench/gpu/run.sh unpacks on a GPU machine that has torch and transformers but
# not alignflow's config dependencies: pydantic (+ pydantic-core, annotated-types, typing-extensions,
# typing-inspection) and pyyaml, for CPython 3.10-3.13 on x86_64 Linux. About 15 MiB; the folder is gitignored.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-../../.venv/bin/python -m pip}"
PYDANTIC="$(../../.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')"
for v in 3.10 3.11 3.12 3.13; do
  $PIP download --quiet --only-binary=:all: --platform manylinux2014_x86_64 --implementation cp \
    --python-version "$v" -d wheels "pydantic==$PYDANTIC" pyyaml
done
# The TRL peer rows: TRL and the parts of `datasets` a CUDA image usually lacks (all pure Python; image-specific
# Python version: 3.12 here, change it to the GPU machine's).
$PIP download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --implementation cp \
  --python-version 3.12 -d wheels "trl==1.16.*" datasets dill multiprocess
ls -la wheels
