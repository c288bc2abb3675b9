# igratech-ws gateway image: `igratech-ws serve` as an unprivileged user.
#
#   docker build -t igratech-ws .
#   docker run -p 8080:8080 -e IGRATECH_WS_JWT_SECRET=... -e IGRATECH_WS_API_KEY=... igratech-ws
#
# PYTHON_IMAGE is any image with Python 3.11+ and `python3 -m venv` (the official slim image by
# default). Where no registry serves it, deploy/debian-python-base.sh builds one from Debian's
# packages (see "Run it in containers" in README.md).
ARG PYTHON_IMAGE=docker.io/library/python:3.12-slim

# --- build: a virtualenv with the gateway and its dependencies, compiled to bytecode ---------
FROM ${PYTHON_IMAGE} AS build
# uv installs in seconds what pip resolves in a minute; it stays in this stage. It trusts the
# system's certificate store (UV_NATIVE_TLS), like pip.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 UV_NO_CACHE=1 UV_LINK_MODE=copy \
    UV_NATIVE_TLS=1
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet uv \
 && python3 -m venv --without-pip /opt/igratech-ws
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN /opt/uv/bin/uv pip install --quiet --compile-bytecode --python /opt/igratech-ws/bin/python \
    -r pyproject.toml
COPY asyncapi ./asyncapi
# The browser client's source (src/igratech_ws/static/igratech-ws-client.js is a symlink to it).
COPY clients/js/igratech-ws-client.js ./clients/js/igratech-ws-client.js
COPY src ./src
RUN /opt/uv/bin/uv pip install --quiet --compile-bytecode --no-deps \
    --python /opt/igratech-ws/bin/python .

# --- runtime: the virtualenv alone, run by an unprivileged user --------------------------------
FROM ${PYTHON_IMAGE}
COPY --from=build /opt/igratech-ws /opt/igratech-ws
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 igratech-ws \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin igratech-ws
ENV PATH=/opt/igratech-ws/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IGRATECH_WS_HOST=0.0.0.0 \
    IGRATECH_WS_PORT=8080 \
    IGRATECH_WS_API_PORT=8081
USER 10001:10001
# 8080: the public WebSocket listener. 8081: the internal API (publish, probes, metrics), bound to
# 127.0.0.1 unless IGRATECH_WS_API_HOST says otherwise: publish it only on a private network.
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["igratech-ws", "health"]
CMD ["igratech-ws", "serve"]
