#!/usr/bin/env bash
# Stop a PostgreSQL started by scripts/pg-start.sh and delete its data.
#
#   scripts/pg-stop.sh [INFO_FILE | PORT]    # default: $NOETL_TEST_PG_INFO, else the file for $PGPORT/55433
set -euo pipefail

log() { echo "pg-stop: $*" >&2; }

arg="${1:-}"
if [[ -n "$arg" && -f "$arg" ]]; then
  INFO="$arg"
elif [[ "$arg" =~ ^[0-9]+$ ]]; then
  INFO="${TMPDIR:-/tmp}/noetl-test-pg.$arg.info"
elif [[ -n "${NOETL_TEST_PG_INFO:-}" ]]; then
  INFO="$NOETL_TEST_PG_INFO"
else
  INFO="${TMPDIR:-/tmp}/noetl-test-pg.${PGPORT:-55433}.info"
fi
[[ -f "$INFO" ]] || { log "no info file $INFO: nothing to stop"; exit 0; }

PGDATA="" BASE="" PG_BIN="" RUN_AS="" PORT=""
# shellcheck disable=SC1090
source "$INFO"
[[ -n "$PGDATA" && -n "$PG_BIN" ]] || { log "malformed info file $INFO"; exit 1; }

RUN=()
[[ -n "$RUN_AS" && "$(id -u)" -eq 0 ]] && RUN=(runuser -u "$RUN_AS" --)

if [[ -f "$PGDATA/postmaster.pid" ]]; then
  "${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >&2 \
    || "${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >&2 || true
fi
# Only delete what pg-start.sh created.
if [[ -n "$BASE" && "$(basename "$BASE")" == noetl-pg.* && -d "$BASE" ]]; then
  rm -rf "$BASE"
fi
rm -f "$INFO"
log "stopped ${PORT:+port $PORT }($PGDATA)"
