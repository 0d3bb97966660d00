#!/usr/bin/env bash
# Server mode on one machine, no Docker: an MLflow tracking server (backend store on PostgreSQL, artifacts
# in a folder, served through the tracking server) and a Prefect server (database on PostgreSQL).
#
#   infra/local-up.sh                 # start both, print the settings that point alignflow at them
#   source alignflow-infra/env.sh     # MLFLOW_TRACKING_URI, PREFECT_API_URL
#   alignflow pipeline --config configs/demo.yaml      # the same pipeline, now in server mode
#   infra/local-down.sh               # stop both
#
# Settings (environment, with defaults):
#   ALIGNFLOW_INFRA_DIR=./alignflow-infra   logs, pid files, artifacts, Prefect home, env.sh
#   ALIGNFLOW_BIND=127.0.0.1                address both servers listen on
#   MLFLOW_PORT=5000  PREFECT_PORT=4200
#   PGHOST=127.0.0.1 PGPORT=5432 PGUSER=$USER PGPASSWORD=   an existing PostgreSQL server
#   ALIGNFLOW_MLFLOW_DB=alignflow_mlflow ALIGNFLOW_PREFECT_DB=alignflow_prefect   created when missing
#   ALIGNFLOW_BIN=<folder with mlflow, prefect>  default: the venv of this repository, else $PATH
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dir="$(mkdir -p "${ALIGNFLOW_INFRA_DIR:-./alignflow-infra}" && cd "${ALIGNFLOW_INFRA_DIR:-./alignflow-infra}" && pwd)"
bind="${ALIGNFLOW_BIND:-127.0.0.1}"
mlflow_port="${MLFLOW_PORT:-5000}"
prefect_port="${PREFECT_PORT:-4200}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-${USER:-$(id -un)}}"
mlflow_db="${ALIGNFLOW_MLFLOW_DB:-alignflow_mlflow}"
prefect_db="${ALIGNFLOW_PREFECT_DB:-alignflow_prefect}"
bin="${ALIGNFLOW_BIN:-}"
if [[ -z "$bin" && -x "$repo/.venv/bin/mlflow" ]]; then bin="$repo/.venv/bin"; fi
mlflow_cmd="${bin:+$bin/}mlflow"
prefect_cmd="${bin:+$bin/}prefect"
python_cmd="${bin:+$bin/}python"
[[ -n "$bin" ]] || python_cmd=python3

# URL parts: user[:password]@host:port (the password, if any, percent-encoded)
auth="$("$python_cmd" -c 'import os, urllib.parse as u; p=os.environ.get("PGPASSWORD", ""); print(u.quote(os.environ["PGUSER"], safe="") + (":" + u.quote(p, safe="") if p else ""))')"
pg="$auth@$PGHOST:$PGPORT"

running() { [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

wait_http() {  # url seconds name
  local i
  for ((i = 0; i < $2; i++)); do
    if "$python_cmd" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$1" 2>/dev/null; then
      return 0
    fi
    if ! running "$3"; then echo "$3 exited; see $dir/$3.log" >&2; tail -20 "$dir/$3.log" >&2; return 1; fi
    sleep 1
  done
  echo "$3 did not answer on $1 in $2 s; see $dir/$3.log" >&2
  return 1
}

ensure_db() {
  if ! "$python_cmd" - "$1" <<'PY'
import os, sys
import psycopg2
from psycopg2 import sql
name = sys.argv[1]
conn = psycopg2.connect(dbname=os.environ.get("ALIGNFLOW_PG_ADMIN_DB", "postgres"))
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if cur.fetchone() is None:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        print(f"created database {name}")
conn.close()
PY
  then
    echo "cannot reach PostgreSQL at $PGHOST:$PGPORT as $PGUSER (set PGHOST/PGPORT/PGUSER/PGPASSWORD)" >&2
    return 1
  fi
}

ensure_db "$mlflow_db"
ensure_db "$prefect_db"
mkdir -p "$dir/mlartifacts" "$dir/prefect-home"

if running mlflow; then
  echo "mlflow server already running (pid $(cat "$dir/mlflow.pid"))"
else
  setsid "$mlflow_cmd" server --host "$bind" --port "$mlflow_port" --workers 1 \
    --backend-store-uri "postgresql+psycopg2://$pg/$mlflow_db" \
    --artifacts-destination "$dir/mlartifacts" --serve-artifacts \
    >"$dir/mlflow.log" 2>&1 </dev/null &
  echo $! >"$dir/mlflow.pid"
fi

if running prefect; then
  echo "prefect server already running (pid $(cat "$dir/prefect.pid"))"
else
  PREFECT_HOME="$dir/prefect-home" \
  PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$pg/$prefect_db" \
  PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PREFECT_UI_API_URL="http://$bind:$prefect_port/api" \
    setsid "$prefect_cmd" server start --host "$bind" --port "$prefect_port" \
    >"$dir/prefect.log" 2>&1 </dev/null &
  echo $! >"$dir/prefect.pid"
fi

if ! wait_http "http://$bind:$mlflow_port/health" "${ALIGNFLOW_START_TIMEOUT:-180}" mlflow ||
   ! wait_http "http://$bind:$prefect_port/api/health" "${ALIGNFLOW_START_TIMEOUT:-180}" prefect; then
  ALIGNFLOW_INFRA_DIR="$dir" "$here/local-down.sh"
  exit 1
fi

cat >"$dir/env.sh" <<ENV
export MLFLOW_TRACKING_URI=http://$bind:$mlflow_port
export PREFECT_API_URL=http://$bind:$prefect_port/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
ENV
echo "MLflow  UI and tracking: http://$bind:$mlflow_port   (backend postgresql://$PGHOST:$PGPORT/$mlflow_db, artifacts $dir/mlartifacts)"
echo "Prefect UI:              http://$bind:$prefect_port   (API http://$bind:$prefect_port/api, database $prefect_db)"
echo "point alignflow at them:  source $dir/env.sh"
