# Two commands matter: `make demo` and `make test`. Both create/update the venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.intern2-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv browser test demo bench clean

venv: $(STAMP)

# Re-install only when the project metadata changed (editable install: source edits need nothing).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[all]' $(TORCH_PINS)
	touch $(STAMP)

# The web page test drives Debian's chromium (about 35 s to install). Install it when we can, as root with
# apt-get; never fail the build when we cannot: the test then skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing chromium for the web page test" && \
	    apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium is not installed: the web page test will be skipped"

test: venv browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/intern2 demo

bench: venv
	$(BIN)/python benchmarks/dcnv3.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
