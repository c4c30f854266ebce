#!/usr/bin/env bash
# Start (or restart) the sweep's MLflow tracking server on the Ray head; run by the cluster
# configs' head_start_ray_commands. The server binds to the head's PRIVATE address only (never
# 0.0.0.0): the cluster's nodes reach it, the internet does not (the cloud firewall / security
# group keeps port 5000 closed from outside). Look at the UI through an SSH tunnel (README).
#
#   start_mlflow.sh [HOST]      HOST default: MEDSCALE_MLFLOW_HOST, else the first private IP
#   start_mlflow.sh --stop      stop it (`ray down` stops Ray only; on-prem hosts keep running)
#
# Environment (all optional):
#   MEDSCALE_MLFLOW_PORT       5000
#   MEDSCALE_MLFLOW_BACKEND    sqlite:///$HOME/medscale-mlflow/mlflow.db  (or postgresql://user:pw@db/mlflow)
#   MEDSCALE_MLFLOW_ARTIFACTS  $HOME/medscale-mlflow/artifacts             (or s3://bucket/mlflow, gs://...)
#
# It writes MLFLOW_TRACKING_URI to ~/.medscale_env, sourced by ~/.bashrc: every sweep started on
# the head (ray submit, ray job submit, ssh) tracks into this server with `tracking_uri: null`.
set -euo pipefail

dir="$HOME/medscale-mlflow"
stop_previous() {  # the server this script started (its pid file), never anything else
  if [ -f "$dir/server.pid" ] && kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
    kill "$(cat "$dir/server.pid")" || true
    sleep 3
  fi
  rm -f "$dir/server.pid"
}
if [ "${1:-}" = "--stop" ]; then stop_previous; exit 0; fi

host="${1:-${MEDSCALE_MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}}"
port="${MEDSCALE_MLFLOW_PORT:-5000}"
backend="${MEDSCALE_MLFLOW_BACKEND:-sqlite:///$dir/mlflow.db}"
artifacts="${MEDSCALE_MLFLOW_ARTIFACTS:-$dir/artifacts}"
case "$host" in
  ""|0.0.0.0|::|"[::]") echo "start_mlflow.sh: refusing to bind MLflow to '$host' (every interface)" >&2; exit 2 ;;
esac
mkdir -p "$dir"

stop_previous

# sqlite allows one writer: one worker process; a Postgres backend can take more. Server-side
# job execution (GenAI evaluation jobs, a pool of extra processes) is not needed for tracking.
workers=1
case "$backend" in postgres*) workers=4 ;; esac
MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server --host "$host" --port "$port" --workers "$workers" \
  --backend-store-uri "$backend" --artifacts-destination "$artifacts" >"$dir/server.log" 2>&1 &
echo $! >"$dir/server.pid"

echo "export MLFLOW_TRACKING_URI=http://$host:$port MLFLOW_DISABLE_TELEMETRY=true" >"$HOME/.medscale_env"
grep -qs medscale_env "$HOME/.bashrc" || echo '[ -f ~/.medscale_env ] && . ~/.medscale_env' >>"$HOME/.bashrc"

for _ in $(seq 90); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://$host:$port/health', timeout=2)" 2>/dev/null; then
    echo "MLflow tracking server at http://$host:$port (backend $backend)"
    exit 0
  fi
  sleep 1
done
echo "start_mlflow.sh: the server did not answer; see $dir/server.log" >&2
tail -20 "$dir/server.log" >&2
exit 1
