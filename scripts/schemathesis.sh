#!/usr/bin/env bash
# Property-based tests of the HTTP API against its own OpenAPI document (schemathesis 4, every check):
# no 5xx, every status and body as the document declares, requests the document allows are accepted and
# those it forbids are refused. Settings: scripts/schemathesis.toml. docs/security.md, "The API document, checked by schemathesis".
#
#   bash scripts/schemathesis.sh                      # starts a throwaway `noetl server` (its own store)
#   NOETL_API_TOKEN=... bash scripts/schemathesis.sh --url http://127.0.0.1:8080 --label kafka
#
# Options: --url URL (a running server; the token in NOETL_API_TOKEN, an admin's: the run calls every
# route, cancel and credential delete included, so never point it at a server whose data matters),
# --label NAME (for the summary line), --max-examples N (per operation; NOETL_SCHEMATHESIS_EXAMPLES,
# default 10), --seed N (NOETL_SCHEMATHESIS_SEED, default 1: CI is reproducible; any seed may be tried).
# Exit status: schemathesis's (0: no failure).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

URL=""
LABEL="noetl server"
EXAMPLES="${NOETL_SCHEMATHESIS_EXAMPLES:-10}"
SEED="${NOETL_SCHEMATHESIS_SEED:-1}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --url) URL="$2"; shift 2 ;;
    --label) LABEL="$2"; shift 2 ;;
    --max-examples) EXAMPLES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if ! command -v schemathesis >/dev/null 2>&1; then
  echo "schemathesis is not installed: pip install -e '.[test]'" >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/noetl-schemathesis.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ -z "$URL" ]]; then
  # A throwaway embedded server: its store, its admin token (admin.token beside the store), its port.
  PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  noetl server --port "$PORT" --store "$WORK/noetl.db" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  URL="http://127.0.0.1:$PORT"
  for _ in $(seq 1 150); do
    curl -fs "$URL/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.2
  done
  NOETL_API_TOKEN="$(cat "$WORK/admin.token")"
fi
if [[ -z "${NOETL_API_TOKEN:-}" ]]; then
  echo "NOETL_API_TOKEN is not set (an admin token of the server at $URL)" >&2
  exit 2
fi
export NOETL_API_TOKEN   # read by scripts/schemathesis.toml: the token never appears on a command line

# One worker: with two, hypothesis (under schemathesis 4.32) sometimes stops an operation with "AST
# constructor recursion depth mismatch", an error of the tool's threads, not of the API.
set +e
(cd "$WORK" && schemathesis --config-file "$ROOT/scripts/schemathesis.toml" run "$URL/openapi.json" \
   --checks all --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 --no-color) | tee "$WORK/run.txt"
rc=${PIPESTATUS[0]}
set -e
# One line for the CI log: how much was tested and what it found.
operations="$(sed -n 's/^ *Tested: *\([0-9]*\).*/\1/p' "$WORK/run.txt" | tail -1)"
cases="$(sed -n 's/^ *\([0-9]*\) generated.*/\1/p' "$WORK/run.txt" | tail -1)"
failures="$(grep -Eo '[0-9]+ (unique )?failures?' "$WORK/run.txt" | tail -1 || true)"
errors="$(grep -Eo '^=+ .*[0-9]+ errors?' "$WORK/run.txt" | grep -Eo '[0-9]+ errors?' | tail -1 || true)"
echo "schemathesis ($LABEL): ${operations:-?} operations, ${cases:-?} cases, ${failures:-0 failures}," \
     "${errors:-0 errors}, exit $rc"
if [[ $rc -ne 0 && -n "$SERVER_PID" ]]; then
  echo "---- server log (last 40 lines)"
  tail -n 40 "$WORK/server.log"
fi
exit "$rc"
