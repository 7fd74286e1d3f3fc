#!/usr/bin/env bash
# Stop a cluster started by scripts/cluster-start.sh: its service processes, then the Kafka (Tansu) and the
# Postgres it started itself (an external Kafka or Postgres is left alone), then its directory.
#
#   scripts/cluster-stop.sh [INFO_FILE]        # default: $NOETL_CLUSTER_INFO
#   NOETL_CLUSTER_KEEP_LOGS=1 scripts/cluster-stop.sh   # keep the directory with the logs
#
# Each service gets SIGTERM (graceful: the query service commits, workers finish in-flight commands) and
# NOETL_CLUSTER_STOP_GRACE seconds (default 20), then SIGKILL. Ingest is stopped first, so nothing new
# comes in while the others drain.
set -euo pipefail

log() { echo "cluster-stop: $*" >&2; }

INFO="${1:-${NOETL_CLUSTER_INFO:-}}"
[[ -n "$INFO" ]] || { log "give the info file (or set NOETL_CLUSTER_INFO)"; exit 2; }
[[ -f "$INFO" ]] || { log "no info file $INFO: nothing to stop"; exit 0; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

BASE="" ROLES="" KAFKA_INFO="" PG_INFO=""
# shellcheck disable=SC1090
source "$INFO"
GRACE="${NOETL_CLUSTER_STOP_GRACE:-20}"

# Only signal a pid that still runs one of our services (the pid may have been reused).
is_ours() { [[ -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "-m noetl_"; }

stop_pids() {  # stop_pids NAME... : TERM all, wait for all, KILL the rest
  local name pid pids=() deadline
  for name in "$@"; do
    pid_var="PID_$name"
    pid="${!pid_var:-}"
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    if is_ours "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid:$name")
    fi
  done
  deadline=$((SECONDS + GRACE))
  for entry in "${pids[@]+"${pids[@]}"}"; do
    pid="${entry%%:*}" name="${entry#*:}"
    while is_ours "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    if is_ours "$pid"; then
      log "$name (pid $pid) ignored SIGTERM for ${GRACE}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    else
      log "stopped $name (pid $pid)"
    fi
  done
}

read -r -a ALL <<<"$ROLES"
others=()
for name in "${ALL[@]+"${ALL[@]}"}"; do [[ "$name" == ingest ]] || others+=("$name"); done
stop_pids ingest
stop_pids "${others[@]+"${others[@]}"}"

if [[ -n "$KAFKA_INFO" ]]; then bash "$ROOT/scripts/kafka-stop.sh" "$KAFKA_INFO" || true; fi
if [[ -n "$PG_INFO" ]]; then bash "$ROOT/scripts/pg-stop.sh" "$PG_INFO" || true; fi

if [[ "${NOETL_CLUSTER_KEEP_LOGS:-0}" == 1 ]]; then
  log "logs kept in $BASE"
elif [[ -n "$BASE" && "$(basename "$BASE")" == noetl-cluster.* && -d "$BASE" ]]; then
  rm -rf "$BASE"   # only a directory cluster-start.sh made itself
else
  rm -f "$INFO"
  log "left $BASE in place (not a directory cluster-start.sh created); removed its info file"
fi
