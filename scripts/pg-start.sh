#!/usr/bin/env bash
# Start a throwaway PostgreSQL for tests and CI (trust auth, fsync=off, 127.0.0.1 only).
#
#   eval "$(scripts/pg-start.sh [PORT])"     # PORT: argument, else $PGPORT, else 55433
#   ... tests use $NOETL_TEST_PG_DSN ...
#   scripts/pg-stop.sh "$NOETL_TEST_PG_INFO"   # only with the info file printed here: never by port
#
# stdout carries only the `export` lines; progress goes to stderr. A port given as an argument must be
# free; otherwise, when the default port is taken, the next free port is used.
set -euo pipefail

log() { echo "pg-start: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

find_pg_bin() {  # the newest version present
  local d best=""
  while read -r d; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && best="$d"
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
  echo "$best"
}

PG_BIN="$(find_pg_bin)"
if [[ -z "$PG_BIN" ]]; then
  [[ "$(id -u)" -eq 0 ]] || die "no PostgreSQL under /usr/lib/postgresql and not root: install the 'postgresql' package"
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  PG_BIN="$(find_pg_bin)"
  [[ -n "$PG_BIN" ]] || die "postgresql installed but no binaries under /usr/lib/postgresql/*/bin"
fi
log "using $PG_BIN"

if [[ $# -ge 1 ]]; then
  PORT="$1"
  port_busy "$PORT" && die "port $PORT is already in use"
else
  PORT="${PGPORT:-55433}"
  for _ in $(seq 1 100); do
    port_busy "$PORT" || break
    log "port $PORT is in use, trying $((PORT + 1))"
    PORT=$((PORT + 1))
  done
  port_busy "$PORT" && die "no free port found"
fi

# initdb refuses to run as root: run the server as `postgres` then.
RUN=()
if [[ "$(id -u)" -eq 0 ]]; then
  if ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  fi
  RUN=(runuser -u postgres --)
fi

BASE="$(mktemp -d "${TMPDIR:-/tmp}/noetl-pg.XXXXXX")"
chmod 755 "$BASE"
[[ ${#RUN[@]} -gt 0 ]] && chown postgres: "$BASE"
PGDATA_DIR="$BASE/data"
INFO="${NOETL_TEST_PG_INFO:-${TMPDIR:-/tmp}/noetl-test-pg.$PORT.info}"

cleanup_on_error() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed; server log follows"
    [[ -f "$BASE/server.log" ]] && tail -n 30 "$BASE/server.log" >&2
    "${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$BASE"
  fi
}
trap cleanup_on_error EXIT

"${RUN[@]}" "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --no-sync >"$BASE/initdb.log" 2>&1 \
  || { cat "$BASE/initdb.log" >&2; die "initdb failed"; }

"${RUN[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$BASE/server.log" -w -t 60 start \
  -o "-p $PORT -k $BASE -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  >&2 || die "server did not start"

# Write the info file as soon as a server runs, so pg-stop.sh can always find it.
cat >"$INFO" <<INFO_EOF
PGDATA=$PGDATA_DIR
BASE=$BASE
PG_BIN=$PG_BIN
PORT=$PORT
RUN_AS=$([[ ${#RUN[@]} -gt 0 ]] && echo postgres || echo "")
PID=$(head -n 1 "$PGDATA_DIR/postmaster.pid")
INFO_EOF

deadline=$((SECONDS + 60))
until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres; do
  (( SECONDS < deadline )) || die "server not ready after 60 s"
  sleep 0.1
done
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres test || die "createdb test failed"

trap - EXIT
log "ready on 127.0.0.1:$PORT (data: $PGDATA_DIR, info: $INFO)"
echo "export NOETL_TEST_PG_DSN=postgresql://postgres@127.0.0.1:$PORT/test"
echo "export NOETL_TEST_PG_INFO=$INFO"
