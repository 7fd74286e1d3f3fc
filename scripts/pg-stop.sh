#!/usr/bin/env bash
# Stop a PostgreSQL started by scripts/pg-start.sh and delete its data.
#
#   scripts/pg-stop.sh INFO_FILE      # the NOETL_TEST_PG_INFO that pg-start.sh printed
#   scripts/pg-stop.sh                # the same, from $NOETL_TEST_PG_INFO (set by `eval "$(pg-start.sh)"`)
#
# Only the info file says which server this caller started. Without it the script refuses (exit 2): a port
# number or a guessed default file (/tmp/noetl-test-pg.55433.info) may name a server that someone else
# started on this machine, and stopping it would delete their data.
set -euo pipefail

log() { echo "pg-stop: $*" >&2; }

INFO="${1:-${NOETL_TEST_PG_INFO:-}}"
if [[ -z "$INFO" ]]; then
  log "refusing: name the info file pg-start.sh printed (NOETL_TEST_PG_INFO); without it the server to stop is unknown"
  exit 2
fi
if [[ "$INFO" =~ ^[0-9]+$ ]]; then
  log "refusing: '$INFO' is a port, not an info file; a port does not say who started the server on it"
  exit 2
fi
[[ -f "$INFO" ]] || { log "no info file $INFO: nothing stopped"; exit 1; }

PGDATA="" BASE="" PG_BIN="" RUN_AS="" PORT=""
# shellcheck disable=SC1090
source "$INFO"
# What pg-start.sh writes: a data folder inside its own mktemp folder noetl-pg.XXXXXX.
if [[ -z "$PG_BIN" || -z "$BASE" || "$(basename "$BASE")" != noetl-pg.* || "$PGDATA" != "$BASE/data" ]]; then
  log "refusing: $INFO is not an info file written by pg-start.sh"
  exit 1
fi

RUN=()
[[ -n "$RUN_AS" && "$(id -u)" -eq 0 ]] && RUN=(runuser -u "$RUN_AS" --)

if [[ -f "$PGDATA/postmaster.pid" ]]; then
  "${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >&2 \
    || "${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >&2 || true
fi
[[ -d "$BASE" ]] && rm -rf "$BASE"
rm -f "$INFO"
log "stopped ${PORT:+port $PORT }($PGDATA)"
