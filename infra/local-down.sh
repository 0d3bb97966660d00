#!/usr/bin/env bash
# Stop what infra/local-up.sh started (the same ALIGNFLOW_INFRA_DIR). The databases stay.
set -uo pipefail
dir="${ALIGNFLOW_INFRA_DIR:-./alignflow-infra}"
for name in prefect mlflow; do
  pidfile="$dir/$name.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $name (process group $pid)"
  fi
  rm -f "$pidfile"
done
