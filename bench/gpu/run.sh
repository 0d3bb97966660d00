#!/usr/bin/env bash
# The GPU benchmark on one machine with torch, transformers, accelerate (and pandas) only: no prefect, mlflow,
# great-expectations, no network. alignflow comes from this source tree (bench/gpu/run.py links it in);
# pydantic and pyyaml, which alignflow.config needs, come from bench/gpu/wheels/ when the machine lacks them
# (fill that folder with bench/gpu/fetch_wheels.sh where PyPI is reachable, and carry it along).
#
#   bench/gpu/run.sh              # H100 run, < 8 minutes; table printed last, JSON in $OUT or bench/gpu/results/
#   bench/gpu/run.sh --tiny       # CPU smoke test, < 2 minutes
#   bench/gpu/run.sh --compile    # also torch.compile rows (adds compilation time)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true DISABLE_MLFLOW_INTEGRATION=TRUE
if ! "$PY" -c "import pydantic, yaml" 2>/dev/null; then
  if ! ls bench/gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "pydantic/pyyaml are missing and bench/gpu/wheels/ is empty: run bench/gpu/fetch_wheels.sh first" >&2
    exit 2
  fi
  DEPS="$(mktemp -d)"
  # Unpack the wheels that fit this interpreter (pure-Python ones and cpXY binary ones); no pip, no network.
  "$PY" - "$DEPS" <<'PYEOF'
import glob, sys, sysconfig, zipfile
dest, tag = sys.argv[1], f"cp{sys.version_info.major}{sys.version_info.minor}"
machine = sysconfig.get_platform().split("-")[-1]
for wheel in sorted(glob.glob("bench/gpu/wheels/*.whl")):
    parts = wheel.rsplit("/", 1)[-1][:-4].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    if (abi == "none" and plat == "any") or (py == tag and plat.endswith(machine)):
        zipfile.ZipFile(wheel).extractall(dest)
PYEOF
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import pydantic, yaml" || { echo "no carried wheel fits $("$PY" -V)" >&2; exit 2; }
fi
exec "$PY" bench/gpu/run.py "$@"
