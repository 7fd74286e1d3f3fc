#!/usr/bin/env bash
# Stop a broker started by scripts/kafka-start.sh and delete its log directory.
#
#   scripts/kafka-stop.sh [INFO_FILE | PORT]  # default: $NOETL_TEST_KAFKA_INFO, else the file for $KAFKA_PORT/19092
set -euo pipefail

log() { echo "kafka-stop: $*" >&2; }

arg="${1:-}"
if [[ -n "$arg" && -f "$arg" ]]; then
  INFO="$arg"
elif [[ "$arg" =~ ^[0-9]+$ ]]; then
  INFO="${TMPDIR:-/tmp}/noetl-test-kafka.$arg.info"
elif [[ -n "${NOETL_TEST_KAFKA_INFO:-}" ]]; then
  INFO="$NOETL_TEST_KAFKA_INFO"
else
  INFO="${TMPDIR:-/tmp}/noetl-test-kafka.${KAFKA_PORT:-19092}.info"
fi
[[ -f "$INFO" ]] || { log "no info file $INFO: nothing to stop"; exit 0; }

BASE="" PID="" PORT=""
# shellcheck disable=SC1090
source "$INFO"
[[ "$PID" =~ ^[0-9]+$ ]] || { log "malformed info file $INFO"; exit 1; }

# Only signal the process if it still is the broker we started (the pid may have been reused).
is_ours() { [[ -r "/proc/$PID/cmdline" ]] && tr '\0' ' ' <"/proc/$PID/cmdline" | grep -q "tansu broker"; }

if is_ours; then
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 100); do
    is_ours || break
    sleep 0.05
  done
  if is_ours; then
    log "pid $PID ignored SIGTERM; killing it"
    kill -KILL "$PID" 2>/dev/null || true
  fi
fi
# Only delete what kafka-start.sh created.
if [[ -n "$BASE" && "$(basename "$BASE")" == noetl-kafka.* && -d "$BASE" ]]; then
  rm -rf "$BASE"
fi
rm -f "$INFO"
log "stopped ${PORT:+port $PORT }(pid $PID)"
