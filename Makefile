# Two commands matter: `make demo` and `make test`. Both create/update the venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.intern2-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean

venv: $(STAMP)

# Re-install only when the project metadata changed (editable install: source edits need nothing).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[all]' $(TORCH_PINS)
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/intern2 demo

bench: venv
	$(BIN)/python benchmarks/dcnv3.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
