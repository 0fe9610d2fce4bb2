# syntax=docker/dockerfile:1
# The gateway: the llmserve package on slim Python, without vLLM. Build from the repository root:
#   docker build -f deploy/images/gateway.Dockerfile -t REGISTRY/gateway:VERSION .
# Only pyproject.toml, README.md and serve/ enter the image (no keys, no .llmserve/, no .git).
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve ./serve
RUN /opt/venv/bin/pip install --no-cache-dir /src

FROM python:3.11.13-slim-bookworm
RUN groupadd --system --gid 10001 llmserve \
    && useradd --system --uid 10001 --gid llmserve --no-create-home --home-dir /tmp llmserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["llmserve"]
CMD ["gateway", "--config", "/etc/llmserve/gateway/gateway.yaml"]
