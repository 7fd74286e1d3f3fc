# One image for every role of the cluster (deploy/helm/noetl runs each as its own Deployment):
#
#   python -m noetl_frontend | noetl_query | noetl_render | noetl_broker | noetl_worker
#   python -m noetl_runtime.postgres_schema          (the schema migration Job)
#
# (noetl_frontend is the `ingest` role: the API, composed from the ingest, query and render routers.)
#
# Settings come only from NOETL_* environment variables (libs/runtime/noetl_runtime/settings.py).
#
#   docker build -t noetl-engine:0.1.0 .
#
# Two stages: the first installs the package and its dependencies into a virtualenv (every dependency ships
# a CPython 3.11 manylinux wheel, so no compiler is needed or installed) and checks that every role's
# module is importable and no requirement is missing (`pip check`); the second copies only that
# virtualenv onto a clean base and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/noetl
WORKDIR /src
# The dependencies (and the build backend) first, in a layer of their own that only a change to
# pyproject.toml rebuilds: a change to the code then reinstalls the project alone, offline, in seconds.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); e = p['project']['optional-dependencies']; print('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] + e['server'] + e['kafka']))" > /tmp/requirements.txt \
    && /opt/noetl/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY libs ./libs
COPY services ./services
RUN /opt/noetl/bin/pip install ".[server,kafka]" --no-deps --no-build-isolation \
    && /opt/noetl/bin/pip check \
    && /opt/noetl/bin/python -c "import noetl_frontend, noetl_query, noetl_render, noetl_broker, noetl_worker, noetl_cli"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="noetl-engine" \
      org.opencontainers.image.description="NoETL playbook engine: ingest, broker, query, render and worker roles" \
      org.opencontainers.image.source="https://github.com/noetl/noetl"
# uid/gid 10001: the engine, the chart's podSecurityContext (runAsNonRoot needs a numeric USER to verify).
# uid/gid 10002 `noetl-step`: the step user, for python step code, in its own group so that it can read
# nothing of the engine's (issue 9 scope 3: a worker started as root runs python steps as NOETL_STEP_USER,
# set below; docs/security.md, "Deployment"). The engine's working directory is 0700.
# No `# syntax=` line: it makes BuildKit fetch a frontend image, which fails offline.
RUN groupadd --system --gid 10001 noetl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
               --shell /usr/sbin/nologin noetl \
    && groupadd --system --gid 10002 noetl-step \
    && useradd --system --uid 10002 --gid 10002 --no-create-home --home-dir /nonexistent \
               --shell /usr/sbin/nologin noetl-step \
    && mkdir -p /var/lib/noetl \
    && chown 10001:10001 /var/lib/noetl \
    && chmod 0700 /var/lib/noetl
COPY --from=build /opt/noetl /opt/noetl
# The root filesystem is read-only in the pods: bytecode is compiled at install, HOME and the working
# directory point at the writable emptyDirs (/tmp, /var/lib/noetl: faust keeps its data dir there).
ENV PATH="/opt/noetl/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NOETL_STEP_USER=noetl-step
WORKDIR /var/lib/noetl
USER 10001:10001
EXPOSE 8080
CMD ["noetl", "--help"]
