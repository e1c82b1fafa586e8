# libfse: `make run` serves the embedded model, `make test` runs the whole suite
# (`make test-fast`: the tests that start no daemon).
# Both install what is missing first and reuse what is already built.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := PIP_CONSTRAINT=$(CURDIR)/requirements.lock $(PY) -m pip --quiet --disable-pip-version-check
FSE    := $(VENV)/bin/fse
STAMP  := $(VENV)/.fse-installed
SOCKET ?= $(CURDIR)/fse.sock

BUILD_INPUTS := $(wildcard native/*.c native/*.h native/*.py proto/fse/v1/*.proto) setup.py pyproject.toml requirements.lock \
                clients/python/setup.py clients/python/pyproject.toml

.PHONY: setup run test test-fast lint bench clean system-deps clients clients-test lock

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

# The synthetic and core tests, no daemon processes, no client examples, nothing slow
# (markers: tests/conftest.py, pyproject.toml): under a minute once set up.
test-fast: setup
	$(PY) -m pytest -q -m "not daemon and not clients and not slow"

# buf, the proto linter, built from the version proto/lint/go.mod pins (Go's module cache
# and build cache are reused).
BUF := build/tools/buf
$(BUF): proto/lint/go.mod proto/lint/go.sum
	cd proto/lint && go build -o $(CURDIR)/$(BUF) github.com/bufbuild/buf/cmd/buf

lint: setup $(BUF)
	cd proto && $(CURDIR)/$(BUF) lint
	$(PY) -m ruff check daemon tests bench native clients/python
	$(PY) -m ruff format --check daemon tests bench native clients/python
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# After changing a dependency in pyproject.toml: install it, then pin what the venv holds.
lock: setup
	{ sed -n '1,2p' requirements.lock; $(PY) -m pip freeze --exclude-editable --all | grep -v '^pip=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

bench: setup
	$(PY) bench/run_all.py

# A soak (bench/soak.py, docs/soak.md): SOAK_CLIENTS client processes against one daemon
# for SOAK_MINUTES, a SIGKILL and restart halfway; its last line is one JSON object.
SOAK_MINUTES ?= 30
SOAK_CLIENTS ?= 64
.PHONY: soak
soak: setup
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) --clients $(SOAK_CLIENTS)

clean:
	rm -rf $(VENV) build daemon/fse/_libs daemon/fse/_native*.so clients/python/fse_client/v1 *.egg-info daemon/*.egg-info clients/python/*.egg-info

# `make install [PREFIX=/usr/local] [DESTDIR=]`: the daemon in a venv of its own under
# $(PREFIX)/lib/fse/venv, an `fse` launcher in $(PREFIX)/bin, the systemd unit (ExecStart
# pointing at that launcher) and the example config in /etc/fse, which is never replaced
# once there. Run again, it upgrades the package and keeps the config. The venv's python
# finds its packages relative to itself and the launcher finds the venv relative to
# itself, so a DESTDIR staging tree works once copied to /. PYTHON must live outside
# /home and /root: the unit's ProtectHome=yes hides those from the service.
PREFIX  ?= /usr/local
DESTDIR ?=
INSTALL_PIP_FLAGS ?=
FSE_LIB     := $(DESTDIR)$(PREFIX)/lib/fse
FSE_VENV    := $(FSE_LIB)/venv
FSE_VPIP    := PIP_CONSTRAINT=$(CURDIR)/requirements.lock $(FSE_VENV)/bin/python -m pip --quiet --disable-pip-version-check $(INSTALL_PIP_FLAGS)
FSE_UNITDIR := $(DESTDIR)$(PREFIX)/lib/systemd/system
FSE_CONFDIR := $(DESTDIR)/etc/fse

.PHONY: install
install: | system-deps
	@base=$$(readlink -f "$$($(PYTHON) -c 'import sys; print(sys.base_prefix)')"); \
	case "$$base/" in /home/*|/root/*) echo "warning: $(PYTHON) lives in $$base, which the unit's ProtectHome=yes hides: use a system python (make install PYTHON=/usr/bin/python3)" >&2;; esac
	test -x $(FSE_VENV)/bin/python || $(PYTHON) -m venv $(FSE_VENV)
	$(FSE_VPIP) install "setuptools>=68" wheel "cffi>=1.16" "grpcio-tools>=1.60"
	@# Reuse libllama and the cffi inputs that `make setup` prepared; build them if absent.
	test -f build/libllama.json -a -e daemon/fse/_libs/libllama.so || $(FSE_VENV)/bin/python native/libllama.py --prepare
	$(FSE_VPIP) install --no-build-isolation ./clients/python
	$(FSE_VPIP) install --no-build-isolation .
	install -d $(DESTDIR)$(PREFIX)/bin $(FSE_UNITDIR) $(FSE_CONFDIR)
	printf '%s\n' '#!/bin/sh' '# fse, installed by `make install`: the daemon and CLI from their own venv.' \
	  'here=$$(dirname "$$(readlink -f "$$0")")' \
	  'exec "$$here/../lib/fse/venv/bin/python" -m fse.cli "$$@"' > $(DESTDIR)$(PREFIX)/bin/fse.tmp
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/fse.tmp && mv -f $(DESTDIR)$(PREFIX)/bin/fse.tmp $(DESTDIR)$(PREFIX)/bin/fse
	sed 's|^ExecStart=/usr/local/bin/fse |ExecStart=$(PREFIX)/bin/fse |' daemon/systemd/fse.service > $(FSE_UNITDIR)/fse.service.tmp
	chmod 0644 $(FSE_UNITDIR)/fse.service.tmp && mv -f $(FSE_UNITDIR)/fse.service.tmp $(FSE_UNITDIR)/fse.service
	@if [ -e $(FSE_CONFDIR)/fse.toml ]; then \
	  echo "kept $(FSE_CONFDIR)/fse.toml (the example is daemon/systemd/fse.toml)"; \
	else install -m 0644 daemon/systemd/fse.toml $(FSE_CONFDIR)/fse.toml; fi
	@echo "installed: $(DESTDIR)$(PREFIX)/bin/fse, $(FSE_UNITDIR)/fse.service, $(FSE_CONFDIR)/fse.toml"
	@echo "then: systemctl daemon-reload && systemctl enable --now fse"
