# agentd server image: small, non-root, health-checked with the gRPC health protocol.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY generated generated
COPY server server
COPY client client
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 agentd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY examples examples
RUN mkdir -p /data && chown agentd /data
USER agentd
ENV AGENTD_HOST=0.0.0.0 \
    AGENTD_PORT=50051 \
    AGENTD_SQLITE_PATH=/data/agentd.db \
    AGENTD_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=2); \
sys.exit(0 if s.status == h.HealthCheckResponse.SERVING else 1)"
STOPSIGNAL SIGTERM
CMD ["agentd", "serve", "--app", "examples.support:app"]
