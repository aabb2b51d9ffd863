# crawlfleet: one image for every process; the subcommand picks the role. The same name and tag
# everywhere (docker-compose.yml builds it, k8s/ runs it; tests/test_deploy.py checks):
#
#   docker build -t crawlfleet:0.1.0 .
#   export CRAWLFLEET_REDIS_URL=redis://:PASSWORD@redis:6379/0
#   docker run --rm -e CRAWLFLEET_REDIS_URL crawlfleet:0.1.0              # a worker (the CMD)
#   docker run --rm -e CRAWLFLEET_REDIS_URL crawlfleet:0.1.0 scheduler
#
# Build-time network: PyPI only (the dependencies and setuptools). No apt packages are needed:
# every dependency ships manylinux wheels for CPython 3.11.

# ---------------------------------------------------------------------------------------------
# Build stage: a virtualenv in /opt/venv holding crawlfleet and its dependencies.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so that this layer is rebuilt only when
# pyproject.toml changes and not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then the project itself (what .dockerignore lets through), without touching the dependencies.
# A regular, non-editable install: the runtime stage does not need /src.
COPY . .
RUN pip install --no-deps . \
 && crawlfleet --help > /dev/null

# ---------------------------------------------------------------------------------------------
# Runtime stage: the virtualenv and a non-root user, nothing else.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim

# A fixed numeric UID/GID: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 crawlfleet \
 && useradd --system --uid 10001 --gid crawlfleet --home-dir /home/crawlfleet --create-home \
      --shell /usr/sbin/nologin crawlfleet

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRAWLFLEET_LOG_FORMAT=json

# The output's mount point (CRAWLFLEET_OUTPUT=/data/output in docker-compose.yml and k8s/),
# owned by the crawlfleet user: Docker copies that ownership into a new named volume, so the
# sink can write to it with a read-only root filesystem.
RUN mkdir -p /data/output && chown 10001:10001 /data/output

# `crawlfleet export --out F` / `crawl --out F` write relative paths here (mount a volume).
WORKDIR /home/crawlfleet
USER 10001:10001

# Prometheus /metrics and /healthz when CRAWLFLEET_METRICS_PORT=9100 (the deployments' value).
EXPOSE 9100

# The worker and the scheduler stop cleanly on SIGTERM (the worker finishes or hands back its
# batches within CRAWLFLEET_SHUTDOWN_GRACE seconds); orchestrators must wait a little longer.
STOPSIGNAL SIGTERM

ENTRYPOINT ["crawlfleet"]
CMD ["worker"]
