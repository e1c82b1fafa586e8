# libfse: `make run` serves the embedded model, `make test` runs the whole suite.
# Both install what is missing first and reuse what is already built.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --disable-pip-version-check
FSE    := $(VENV)/bin/fse
STAMP  := $(VENV)/.fse-installed
SOCKET ?= $(CURDIR)/fse.sock

BUILD_INPUTS := $(wildcard native/*.c native/*.h native/*.py proto/fse/v1/*.proto) setup.py pyproject.toml \
                clients/python/setup.py clients/python/pyproject.toml

.PHONY: setup run test lint bench clean system-deps clients clients-test

setup: $(STAMP)
	@$(FSE) model path >/dev/null

# Compilers and cmake come from Debian when the machine lacks them.
system-deps:
	@missing=""; \
	for tool in cc:gcc c++:g++ cmake:cmake ninja:ninja-build pkg-config:pkg-config; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)

# Build requirements live in the venv so the native build needs no isolated env.
# Build outputs are listed too: if one is deleted, the next `make` rebuilds it.
GENERATED := daemon/fse/_native.abi3.so clients/python/fse_client/v1/fse_pb2.py
$(GENERATED):

$(STAMP): $(BUILD_INPUTS) $(GENERATED) | $(PY) system-deps
	$(PIP) install "setuptools>=68" wheel "cffi>=1.16" "grpcio-tools>=1.60"
	$(PY) native/libllama.py --prepare
	$(PIP) install --no-build-isolation -e ./clients/python
	$(PIP) install --no-build-isolation -e '.[dev,plot]'
	@touch $@

run: setup
	$(FSE) serve --listen unix:$(SOCKET)

# Every client folder with a Makefile builds its example into clients/bin (python too).
CLIENTS := $(patsubst clients/%/Makefile,%,$(wildcard clients/*/Makefile))

clients: setup
	@for c in $(CLIENTS); do $(MAKE) --no-print-directory -C clients/$$c build || exit 1; done

# Each client's own unit tests and linters (no daemon needed).
clients-test: clients
	@for c in $(CLIENTS); do $(MAKE) --no-print-directory -C clients/$$c test || exit 1; done

# The suite includes the conformance harness, which runs every client against one daemon.
test: setup lint clients-test
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check daemon tests bench native clients/python
	$(PY) -m ruff format --check daemon tests bench native clients/python
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build daemon/fse/_libs daemon/fse/_native*.so clients/python/fse_client/v1 *.egg-info daemon/*.egg-info clients/python/*.egg-info
