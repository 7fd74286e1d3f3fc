#!/usr/bin/env bash
# Start a local NoETL cluster: ingest, broker, worker(s), query and render as SEPARATE background processes
# on Kafka + Postgres (docs/cluster.md).
#
#   eval "$(scripts/cluster-start.sh)"          # prints: export NOETL_SERVER_URL=... NOETL_CLUSTER_INFO=...
#                                               #   NOETL_API_TOKEN=... (an admin token, unless one was set)
#   noetl run --server "$NOETL_SERVER_URL" examples/hello_world.yaml
#   scripts/cluster-stop.sh                     # uses $NOETL_CLUSTER_INFO (or: cluster-stop.sh INFO_FILE)
#
# Environment (all optional):
#   KAFKA_BOOTSTRAP_SERVERS or NOETL_KAFKA_BOOTSTRAP  an existing Kafka; else Tansu is started (kafka-start.sh)
#   NOETL_DATABASE_URL         an existing Postgres; else a throwaway one is started (pg-start.sh)
#   NOETL_DATABASE_SCHEMA      (noetl)   NOETL_TOPIC_PREFIX (empty)   NOETL_TOPIC_PARTITIONS (6)
#   NOETL_SECRET_KEY           the Fernet key of the credentials, shared by ingest and the workers;
#                              generated when unset (kept in the cluster dir, mode 600)
#   NOETL_BROKER_TOKEN         the token of the broker's /explain and /metrics, shared with ingest and query;
#                              generated when unset (kept in the cluster dir, mode 600)
#   NOETL_INGEST_PORT          the ingest role's port, the API (python -m noetl_frontend; 8080, else the
#                              next free one)
#   NOETL_CLUSTER_WORKERS      worker processes of the pool NOETL_WORKER_POOL (1)
#   NOETL_CLUSTER_DIR          logs, pids and the info file (default: a new temp dir)
#   NOETL_CLUSTER_READY_TIMEOUT  seconds to wait for every /ready (120)
#   PYTHON                     the interpreter (default: the repository's .venv/bin/python, else python3)
#
# stdout carries only the `export` lines; progress goes to stderr. On failure everything started is stopped
# again and the failing role's log is shown.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "cluster-start: $*" >&2; }
die() { log "error: $*"; exit 1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
export PYTHON
command -v curl >/dev/null || die "curl is needed to wait for the services"
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

BASE="${NOETL_CLUSTER_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/noetl-cluster.XXXXXX")}"
mkdir -p "$BASE"
BASE="$(cd "$BASE" && pwd)"
INFO="$BASE/cluster.info"
: >"$INFO"
info() { echo "$1" >>"$INFO"; }
info "BASE=$BASE"

failed_cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed; stopping what was started"
    NOETL_CLUSTER_KEEP_LOGS=1 bash "$ROOT/scripts/cluster-stop.sh" "$INFO" >&2 || true
    log "logs kept in $BASE"
  fi
}
trap failed_cleanup EXIT

# ------------------------------------------------------------------------------------------------ Kafka
BOOTSTRAP="${NOETL_KAFKA_BOOTSTRAP:-${KAFKA_BOOTSTRAP_SERVERS:-}}"
if [[ -z "$BOOTSTRAP" ]]; then
  KAFKA_ENV="$(NOETL_TEST_KAFKA_INFO="$BASE/kafka.info" bash "$ROOT/scripts/kafka-start.sh")"
  eval "$KAFKA_ENV"
  BOOTSTRAP="$KAFKA_BOOTSTRAP_SERVERS"
  info "KAFKA_INFO=$BASE/kafka.info"
  # Tansu answers a group join only after half the session timeout: keep it short (docs/kafka.md).
  export NOETL_KAFKA_SESSION_TIMEOUT_MS="${NOETL_KAFKA_SESSION_TIMEOUT_MS:-3000}"
fi
export NOETL_KAFKA_BOOTSTRAP="$BOOTSTRAP"
info "KAFKA_BOOTSTRAP=$BOOTSTRAP"

# ----------------------------------------------------------------------------------------------- Postgres
if [[ -z "${NOETL_DATABASE_URL:-}" ]]; then
  PG_ENV="$(NOETL_TEST_PG_INFO="$BASE/pg.info" bash "$ROOT/scripts/pg-start.sh")"
  eval "$PG_ENV"
  export NOETL_DATABASE_URL="$NOETL_TEST_PG_DSN"
  info "PG_INFO=$BASE/pg.info"
fi
export NOETL_DATABASE_URL
export NOETL_DATABASE_SCHEMA="${NOETL_DATABASE_SCHEMA:-noetl}"
export NOETL_TOPIC_PREFIX="${NOETL_TOPIC_PREFIX:-}"
export NOETL_TOPIC_PARTITIONS="${NOETL_TOPIC_PARTITIONS:-6}"
export NOETL_WORKER_POOL="${NOETL_WORKER_POOL:-default}"
export NOETL_BROKER_POOLS="${NOETL_BROKER_POOLS:-$NOETL_WORKER_POOL}"
export NOETL_HTTP_HOST=127.0.0.1
export PYTHONUNBUFFERED=1
info "DATABASE_SCHEMA=$NOETL_DATABASE_SCHEMA"
info "TOPIC_PREFIX=$NOETL_TOPIC_PREFIX"

if [[ -z "${NOETL_SECRET_KEY:-}" ]]; then
  (umask 077; "$PYTHON" -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' \
    >"$BASE/secret.key")
  NOETL_SECRET_KEY="$(cat "$BASE/secret.key")"
  log "generated NOETL_SECRET_KEY (in $BASE/secret.key): credentials stored now need it to be read later"
fi
export NOETL_SECRET_KEY

# The broker package may not be installed into the venv (it is not in every checkout's packages list).
if ! "$PYTHON" -c 'import noetl_broker' 2>/dev/null; then
  export PYTHONPATH="$ROOT/services/broker${PYTHONPATH:+:$PYTHONPATH}"
fi

# -------------------------------------------------------------------------------- topics and migrations
log "ensuring topics on $BOOTSTRAP (prefix '${NOETL_TOPIC_PREFIX}', $NOETL_TOPIC_PARTITIONS partitions)"
"$PYTHON" - <<'PY' >&2
import asyncio
from noetl_runtime import kafka_io
from noetl_runtime.settings import load_settings

s = load_settings()
pools = [p.strip() for p in __import__("os").environ["NOETL_BROKER_POOLS"].split(",") if p.strip()]
created = asyncio.run(kafka_io.ensure_topics(s, s.topics, pools, partitions=s.topic_partitions))
print(f"created topics: {created or 'none (all existed)'}")
PY
"$PYTHON" -m noetl_runtime.postgres_schema >&2

# -------------------------------------------------------------------------------------------- API token
# Every route but /health and /ready needs a token (docs/security.md): an admin token for the caller of
# this script, unless NOETL_API_TOKEN is set already. Only its hash is stored (the api_token table); the
# token itself is kept in the cluster dir (mode 600) and exported.
if [[ -z "${NOETL_API_TOKEN:-}" ]]; then
  NOETL_API_TOKEN="$("$PYTHON" -m noetl_cli token create --postgres --role admin --expires 30d \
                     --name "cluster-admin-$(date +%s)-$$")"
  (umask 077; echo "$NOETL_API_TOKEN" >"$BASE/admin.token")
  log "created an admin API token (in $BASE/admin.token)"
fi

# The brokers' /explain and /metrics take the token every role is started with here: the API and query
# roles send it to NOETL_BROKER_URL (docs/security.md, "The broker's listener"). Kept 0600 in the cluster dir.
if [[ -z "${NOETL_BROKER_TOKEN:-}" ]]; then
  NOETL_BROKER_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')"
  (umask 077; echo "$NOETL_BROKER_TOKEN" >"$BASE/broker.token")
fi
export NOETL_BROKER_TOKEN

# ------------------------------------------------------------------------------------------------ roles
ROLES=()
start_role() {  # start_role NAME PORT MODULE
  local name="$1" port="$2" module="$3"
  NOETL_HTTP_PORT="$port" setsid "$PYTHON" -m "$module" </dev/null >"$BASE/$name.log" 2>&1 &
  local pid=$!
  ROLES+=("$name")
  info "ROLES=\"${ROLES[*]}\""
  info "PID_$name=$pid"
  info "PORT_$name=$port"
  eval "PID_$name=$pid PORT_$name=$port"
  log "started $name (pid $pid, port $port, log $BASE/$name.log)"
}

INGEST_PORT="${NOETL_INGEST_PORT:-8080}"
if [[ -n "${NOETL_INGEST_PORT:-}" ]]; then
  port_busy "$INGEST_PORT" && die "port $INGEST_PORT (NOETL_INGEST_PORT) is already in use"
else
  for _ in $(seq 1 100); do port_busy "$INGEST_PORT" || break; INGEST_PORT=$((INGEST_PORT + 1)); done
  port_busy "$INGEST_PORT" && die "no free port for ingest"
fi

# The API and query roles ask the broker what a running execution waits for (GET /api/executions/{id}/explain)
BROKER_PORT="$(free_port)"
export NOETL_BROKER_URL="http://127.0.0.1:$BROKER_PORT"
start_role query "$(free_port)" noetl_query
start_role broker "$BROKER_PORT" noetl_broker
for i in $(seq 1 "${NOETL_CLUSTER_WORKERS:-1}"); do
  start_role "worker$i" "$(free_port)" noetl_worker
done
start_role render "$(free_port)" noetl_render
start_role ingest "$INGEST_PORT" noetl_frontend   # the API: ingest's writes + the reads, one URL
URL="http://127.0.0.1:$INGEST_PORT"
info "URL=$URL"

# ------------------------------------------------------------------------------------------ readiness
deadline=$((SECONDS + ${NOETL_CLUSTER_READY_TIMEOUT:-120}))
pending=("${ROLES[@]}")
while [[ ${#pending[@]} -gt 0 ]]; do
  still=()
  for name in "${pending[@]}"; do
    pid_var="PID_$name" port_var="PORT_$name"
    if ! kill -0 "${!pid_var}" 2>/dev/null; then
      log "$name exited during startup; its log:"
      tail -n 40 "$BASE/$name.log" >&2
      exit 1
    fi
    if curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:${!port_var}/ready"; then
      log "$name ready"
    else
      still+=("$name")
    fi
  done
  pending=("${still[@]+"${still[@]}"}")
  [[ ${#pending[@]} -eq 0 ]] && break
  if (( SECONDS >= deadline )); then
    for name in "${pending[@]}"; do log "$name not ready; its log:"; tail -n 20 "$BASE/$name.log" >&2; done
    die "not ready after ${NOETL_CLUSTER_READY_TIMEOUT:-120} s: ${pending[*]}"
  fi
  sleep 0.2
done

trap - EXIT
log "cluster ready: API $URL (info: $INFO)"
echo "export NOETL_SERVER_URL=$URL"
echo "export NOETL_CLUSTER_INFO=$INFO"
echo "export NOETL_API_TOKEN=$NOETL_API_TOKEN"
echo "export NOETL_BROKER_TOKEN=$NOETL_BROKER_TOKEN"
