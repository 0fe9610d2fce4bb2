# syntax=docker/dockerfile:1
# The GPU engine: vLLM's official CUDA image (vLLM, PyTorch, Ray) with the llmserve launcher on top, so the
# container runs `llmserve engine MODEL_FILE` and vLLM's flags come from the model file. Build from the root:
#   docker build -f deploy/images/engine-gpu.Dockerfile -t REGISTRY/engine-gpu:VERSION .
# The base tag is the vLLM release pinned by the `gpu` extra in pyproject.toml: pip finds it already installed.
FROM vllm/vllm-openai:v0.32.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve ./serve
RUN python3 -m pip install --no-cache-dir "/src[gpu]" \
    && rm -rf /src \
    && groupadd --system --gid 10001 llmserve \
    && useradd --system --uid 10001 --gid llmserve --no-create-home --home-dir /cache llmserve
# Writable paths are volumes in the pod (the root filesystem is read-only); see deploy/k8s/base.
ENV HOME=/cache PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
USER 10001:10001
WORKDIR /cache
EXPOSE 8000
ENTRYPOINT ["llmserve"]
CMD ["engine", "/etc/llmserve/model/model.yaml", "--host", "0.0.0.0", "--port", "8000"]
