# agentd server image: small, non-root, health-checked with the gRPC health protocol.
#
#   docker build -t agentd .
#   docker run --rm -p 50051:50051 -v $PWD/deploy/secrets:/run/agentd:ro \
#     -e AGENTD_API_KEYS_FILE=/run/agentd/keys.json -e AGENTD_TLS_CERT_FILE=/run/agentd/tls.crt \
#     -e AGENTD_TLS_KEY_FILE=/run/agentd/tls.key agentd     # example app, scripted model, TLS + API keys
#   (it listens on 0.0.0.0, so it refuses to start without authentication: README, Security)
#   docker run --rm agentd agentd db migrate               # same image, one-shot migration
#
# Settings are AGENTD_* variables (see README.md); OTLP export uses the standard OTEL_* ones.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install agentd[server,uvloop] (no dev dependencies) into a self-contained venv ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/agentd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY generated generated
COPY server server
COPY client client
RUN /opt/agentd/bin/pip install '.[server,uvloop]'

# --- runtime: the venv (the example app ships inside it), a numeric non-root user ---------
FROM ${PYTHON_IMAGE}
# A numeric USER lets Kubernetes verify runAsNonRoot without a runAsUser of its own.
RUN groupadd --system --gid 10001 agentd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin agentd \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/agentd /opt/agentd
# The working directory is importable: copy your own app module here and set AGENTD_APP.
WORKDIR /app
ENV PATH=/opt/agentd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTD_APP=agentd.examples.support:app \
    AGENTD_HOST=0.0.0.0 \
    AGENTD_PORT=50051 \
    AGENTD_HEALTH_PORT=50052 \
    AGENTD_SQLITE_PATH=/data/agentd.db \
    AGENTD_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051 50052
# Standard grpc.health.v1 check of service "": NOT_SERVING while draining or while the
# session store is unreachable. It asks the plaintext health-only port (AGENTD_HEALTH_PORT),
# which answers whether or not the main port speaks TLS. The same command is used by
# deploy/docker-compose.yml; Kubernetes' gRPC probes use that port too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('AGENTD_HEALTH_PORT', '50052'))).Check(h.HealthCheckRequest(), timeout=2); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM drains: health turns NOT_SERVING, running runs get AGENTD_SHUTDOWN_GRACE_S to
# finish, the rest are handed to other replicas. Give the container more than that to stop.
STOPSIGNAL SIGTERM
CMD ["agentd", "serve"]
