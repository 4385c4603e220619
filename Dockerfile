# syntax=docker/dockerfile:1
# The edge gateway image: edge-broker (default) and gateway-agent from one wheel.
#   docker build -t edge-gateway .
#   docker run --read-only --cap-drop ALL -v /etc/edge-gateway:/etc/edge-gateway:ro \
#     -v edge-state:/var/lib/edge-gateway -p 8883:8883 edge-gateway
#   docker run ... --entrypoint gateway-agent --health-cmd 'gateway-agent status --health' edge-gateway \
#     run -c /etc/edge-gateway/agent.yaml
# Runs as an unprivileged user; writes only to /var/lib/edge-gateway, so --read-only works.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_core edge_core
COPY edge_runtime edge_runtime
COPY broker_plugins broker_plugins
COPY gateway_agent gateway_agent
COPY device_client device_client
COPY configs configs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGE_GATEWAY_CONFIG_DIR=/etc/edge-gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 edge \
    && useradd --system --uid 10001 --gid edge --home-dir /var/lib/edge-gateway --shell /usr/sbin/nologin edge \
    && install -d -o edge -g edge -m 0750 /var/lib/edge-gateway /etc/edge-gateway
USER 10001:10001
WORKDIR /var/lib/edge-gateway
VOLUME ["/var/lib/edge-gateway"]
# 8883 MQTT over TLS 1.3 (mTLS), 8884 certificate test endpoint, 9464 status (bind it beyond
# loopback only with status.bearer_token_file or status.tls; /healthz stays open for this check)
EXPOSE 8883 8884 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["edge-broker", "status", "--health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edge-broker"]
CMD ["run"]
