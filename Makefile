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
test: setup lint clients-test sanitize-quick
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
	$(PY) -m ruff check daemon tests bench native clients/python fuzz
	$(PY) -m ruff format --check daemon tests bench native clients/python fuzz
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

# -- fuzzing and sanitizers (docs/fuzzing.md) ------------------------------------------
# `make fuzz [FUZZ_SECONDS=N]`: every target of fuzz/ for N seconds each, one at a time;
# non-zero on any crash, hang (> 1 s on one input) or failed invariant. New inputs go to
# build/fuzz/corpus/<target>; findings to build/fuzz/crash-*. The committed corpora are
# replayed by tests/fuzz (part of `make test`). Needs clang and atheris: `make fuzz-deps`.
FUZZ_SECONDS ?= 60
CLANG ?= clang-14
FUZZ_BUILD := build/fuzz
FUZZ_PY := $(patsubst fuzz/%.py,%,$(wildcard fuzz/fuzz_*.py))
FUZZ_C := $(patsubst fuzz/%.c,%,$(wildcard fuzz/fuzz_*.c))
FUZZ_TARGETS ?= $(FUZZ_PY) $(FUZZ_C)  # or some of them: make fuzz FUZZ_TARGETS="fuzz_loop"
# llama.h (fuzz_vocab.c stands in for the libllama functions fse_vocab.c calls).
LLAMA_INCLUDES = $(shell $(PYTHON) -c 'import json; print(*("-I" + d for d in json.load(open("build/libllama.json"))["include_dirs"]))' 2>/dev/null)
FUZZ_CFLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Inative $(LLAMA_INCLUDES)
FUZZ_FLAGS = -max_total_time=$(FUZZ_SECONDS) -timeout=1 -rss_limit_mb=4096 -artifact_prefix=$(FUZZ_BUILD)/

.PHONY: fuzz-deps fuzz fuzz-replay sanitize

# clang with libFuzzer from Debian, atheris from pyproject's `fuzz` extra (pinned in
# requirements.lock): not part of `make setup`, which needs neither.
fuzz-deps: setup
	@command -v $(CLANG) >/dev/null && $(CLANG) -print-file-name=libclang_rt.fuzzer-x86_64.a | grep -q / || { \
	  echo "installing Debian packages: clang-14 libclang-rt-14-dev"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq clang-14 libclang-rt-14-dev; }
	@$(PY) -c 'import atheris' 2>/dev/null || $(PIP) install $$($(PY) -c 'import tomllib; \
	  print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["fuzz"])')

# fuzz/fuzz_X.c checks native/fse_X.c.
$(FUZZ_BUILD)/fuzz_%: fuzz/fuzz_%.c native/fse_%.c native/fse.h native/fse_stats_width.h | fuzz-deps
	@mkdir -p $(FUZZ_BUILD)
	$(CLANG) $(FUZZ_CFLAGS) $< native/fse_$*.c -lm -o $@

fuzz: fuzz-deps $(FUZZ_C:%=$(FUZZ_BUILD)/%)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  name=$${t#fuzz_}; mkdir -p $(FUZZ_BUILD)/corpus/$$name; echo "== $$t: $(FUZZ_SECONDS) s"; \
	  if [ -e fuzz/$$t.py ]; then run="$(PY) fuzz/$$t.py"; else run="$(FUZZ_BUILD)/$$t -max_len=32768"; fi; \
	  $$run $(FUZZ_FLAGS) $(FUZZ_BUILD)/corpus/$$name fuzz/corpus/$$name 2>$(FUZZ_BUILD)/$$t.log \
	    || { tail -40 $(FUZZ_BUILD)/$$t.log; echo "fuzz: $$t found something (log: $(FUZZ_BUILD)/$$t.log)"; exit 1; }; \
	  grep -E '^Done|^#[0-9]+.*DONE' $(FUZZ_BUILD)/$$t.log | tail -1; \
	done

# The committed corpora, replayed once (Python targets in-process, C targets built with
# gcc -fsanitize=address,undefined): what `make test` runs, no clang or atheris needed.
fuzz-replay: setup
	$(PY) -m pytest -q tests/fuzz

# The native extension built with ASan and UBSan into build/sanitize (a copy of the
# package tree; the normal build is untouched), then the kernel, guard, sampling and
# engine tests against it. CPython leaks by design: leak detection is off.
SAN_DIR := build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_TESTS := tests/core/test_kernel.py tests/core/test_guards.py tests/core/test_sampling.py tests/core/test_engine.py
# Real generations under ASan run 10-100x slower (~8 of the 9 minutes on 2 cores): `make
# test` runs `sanitize-quick`, every test but these; `make sanitize` runs them all.
SAN_SLOW := same_tokens_as_llama_cpps_chain or other_seeds_draw_other_tokens or greedy_is_deterministic \
  or seed_reproduces or generating_past_the_context or metrics_are_sane_on_real_steps \
  or token_event_text_holds_incomplete_utf8
SAN_PYTEST_ARGS ?=
.PHONY: sanitize-quick
sanitize-quick:
	@$(MAKE) --no-print-directory sanitize SAN_PYTEST_ARGS='-k "not ($(SAN_SLOW))"'

sanitize: setup
	@# build_native.py runs in a tree of its own (its sources, libllama.json, _libs), since
	@# its objects land next to the sources: nothing is written outside $(SAN_DIR).
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)/obj $(SAN_DIR)/pkg $(SAN_DIR)/native $(SAN_DIR)/build $(SAN_DIR)/daemon/fse
	cp native/*.c native/*.h native/build_native.py $(SAN_DIR)/native/
	cp build/libllama.json $(SAN_DIR)/build/ && ln -s $(CURDIR)/daemon/fse/_libs $(SAN_DIR)/daemon/fse/_libs
	cd $(SAN_DIR)/obj && FSE_BUILD_DIR=. CFLAGS="$(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" \
	  $(CURDIR)/$(PY) ../native/build_native.py > ../build.log 2>&1 || { tail -20 ../build.log; exit 1; }
	cp -r daemon/fse $(SAN_DIR)/pkg/fse && rm -rf $(SAN_DIR)/pkg/fse/_libs $(SAN_DIR)/pkg/fse/_native*.so
	ln -s $(CURDIR)/daemon/fse/_libs $(SAN_DIR)/pkg/fse/_libs
	cp $(SAN_DIR)/obj/fse/_native*.so $(SAN_DIR)/pkg/fse/
	@# libstdc++ preloaded too: ASan must see its __cxa_throw at start, or the first C++
	@# exception (llama.cpp refusing a truncated GGUF) fails an ASan CHECK. Reports go to
	@# $(SAN_DIR)/logs (pytest captures stderr) and are printed when the run fails.
	mkdir -p $(SAN_DIR)/logs
	export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:log_path=$(CURDIR)/$(SAN_DIR)/logs/asan \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/$(SAN_DIR)/logs/ubsan \
	  PYTHONPATH=$(SAN_DIR)/pkg; \
	$(PY) -c 'import fse._native as n, sys; sys.exit(None if "$(SAN_DIR)/pkg" in n.__file__ else n.__file__)' && \
	$(PY) -m pytest -q -p no:cacheprovider $(SAN_TESTS) $(SAN_PYTEST_ARGS) \
	  || { cat $(SAN_DIR)/logs/* 2>/dev/null | head -60; exit 1; }
	@if [ -n "$$(ls $(SAN_DIR)/logs)" ]; then cat $(SAN_DIR)/logs/* | head -60; exit 1; fi

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
	sed 's|^ExecStart=/usr/local/bin/fse |ExecStart=$(PREFIX)/bin/fse |' daemon/systemd/fse-rpc-worker.service > $(FSE_UNITDIR)/fse-rpc-worker.service.tmp
	chmod 0644 $(FSE_UNITDIR)/fse-rpc-worker.service.tmp && mv -f $(FSE_UNITDIR)/fse-rpc-worker.service.tmp $(FSE_UNITDIR)/fse-rpc-worker.service
	@if [ -e $(FSE_CONFDIR)/fse.toml ]; then \
	  echo "kept $(FSE_CONFDIR)/fse.toml (the example is daemon/systemd/fse.toml)"; \
	else install -m 0644 daemon/systemd/fse.toml $(FSE_CONFDIR)/fse.toml; fi
	@echo "installed: $(DESTDIR)$(PREFIX)/bin/fse, $(FSE_UNITDIR)/fse.service, $(FSE_UNITDIR)/fse-rpc-worker.service (off until enabled), $(FSE_CONFDIR)/fse.toml"
	@echo "then: systemctl daemon-reload && systemctl enable --now fse"
