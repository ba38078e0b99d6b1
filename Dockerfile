# The streamguard code-location image: the project (with its Spark extra and Java for local
# Spark; dagster-postgres and psycopg2 are project dependencies) and the Dagster instance config
# with the shared storage on PostgreSQL. Its command serves assets.definitions (what
# workspace.yaml loads locally) as a Dagster code server; the ECS webserver and daemon services
# run the same image with their own commands (platform/terraform/ecs.tf).
#
#   docker build -t streamguard:$(git rev-parse --short HEAD) .
#
# Not built here (no Docker engine on the machine it was written on).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    STREAMGUARD_HOME=/var/lib/streamguard

# Spark runs in the run process (local[*]) unless STREAMGUARD_SPARK_MASTER names a cluster;
# pyspark 4 needs Java 17 or 21 (Debian's default JRE is one of them).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/streamguard

# Dependencies first (cached while only the code changes), then the code. Non-editable: the
# packages (streamguard, models, assets) land in site-packages, so `-m assets.definitions`
# works from any directory.
COPY pyproject.toml README.md ./
COPY streamguard ./streamguard
COPY models ./models
COPY assets ./assets
RUN pip install ".[spark]"

# Dagster instance: platform/dagster.yaml's settings (run queue, one scoring run per stream at a
# time) with the run, event-log and schedule storage on PostgreSQL; the storage URL is read from
# DAGSTER_PG_URL (`postgres_url: {env: DAGSTER_PG_URL}`, a postgresql+psycopg2:// URL) when the
# instance loads. tests/test_dagster_postgres.py runs the daemon on this file.
COPY platform/dagster-postgres.yaml ${DAGSTER_HOME}/dagster.yaml

RUN useradd --system --uid 10001 --home-dir /var/lib/streamguard dagster \
    && mkdir -p "${STREAMGUARD_HOME}" "${DAGSTER_HOME}/storage" \
    && chown -R dagster "${STREAMGUARD_HOME}" "${DAGSTER_HOME}"
USER dagster

EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]

CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "assets.definitions", "--location-name", "streamguard"]
