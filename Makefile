# Every target does the set-up it needs on a bare machine (Debian/Ubuntu, root or sudo).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kvstore-installed
APT_PKGS := libxxhash-dev etcd-server redis-server
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run demo test lint bench bench-quick proto native clean system-deps

setup: $(STAMP)

# Debian's packages the build and tests use; services are not started by apt
# (policy-rc.d 101), the tests start their own on free ports.
system-deps:
	@missing=""; \
	[ -f /usr/include/xxhash.h ] || missing="$$missing libxxhash-dev"; \
	command -v etcd >/dev/null || [ -n "$$ETCD_BIN" ] || missing="$$missing etcd-server"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	  $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	fi

$(STAMP): pyproject.toml setup.py proto/kvstore.proto native/copyengine.c | system-deps
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

proto native: system-deps
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

# A single-machine cluster (master on the embedded backend + one DRAM node) and a short demo.
run: setup
	$(BIN)/kvstore up --demo

test: setup
	GRPC_VERBOSITY=ERROR $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check kvstore tests bench setup.py
	$(BIN)/ruff format --check kvstore tests bench
	$(BIN)/mypy kvstore

bench: setup
	$(BIN)/kvstore bench --json bench/out/latest.json

bench-quick: setup
	$(BIN)/kvstore bench --quick

clean:
	rm -rf $(VENV) build *.egg-info kvstore/_proto kvstore/*.so
