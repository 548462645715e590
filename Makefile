# embedshim — see README.md. `make demo` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := python3-venv containerd runc busybox-static libbpf1 clang llvm bpftool libbpf-dev crun criu \
	iproute2 containernetworking-plugins procps util-linux gcc libc6-dev
CRI_PROTO := proto/cri_api.proto
PROTOS := $(filter-out $(CRI_PROTO),$(wildcard proto/*.proto))
CRI_API := integration/cri/api

.PHONY: setup demo test unit integration cri lint proto bpf bench bench-sandbox soak fuzz clean keeper

setup: .setup-debs $(VENV)/.installed keeper/embedshim-keeper \
	holder/embedshim-holder entry/embedshim-entry
	@$(PY) -m shim.cmd.setupcheck

.setup-debs:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
	@$(PY) -m compileall -q shim >/dev/null
	@touch $@

# the daemon's parent, which holds containerd's connections across a crash (keeper/keeper.c)
keeper/embedshim-keeper: keeper/keeper.c keeper/Makefile
	@$(MAKE) -s -C keeper

keeper: keeper/embedshim-keeper

# the pod sandbox holder of `sandboxer = "shim"` (holder/holder.c; none: only podsandbox mode)
holder/embedshim-holder: holder/holder.c holder/Makefile
	@$(MAKE) -s -C holder

# the installed containerd-shim-embed-v1: start and delete without Python (entry/entry.c)
entry/embedshim-entry: entry/entry.c entry/sha256.c entry/sha256.h entry/Makefile
	@$(MAKE) -s -C entry

TEST_PROTOS := $(wildcard integration/proto/*.proto)

# shim/api: the messages the daemon speaks.  integration/api: containerd's gRPC services the
# tests call directly (with grpc stubs; grpcio is a dev dependency only).
proto:
	$(PY) -m grpc_tools.protoc -Iproto --python_out=shim/api --pyi_out=shim/api $(PROTOS)
	sed -i -E 's/^import ([a-z_]+_pb2) as /from . import \1 as /' shim/api/*_pb2.py shim/api/*_pb2.pyi
	$(PY) -m grpc_tools.protoc -Iproto -Iintegration/proto --python_out=integration/api \
		--pyi_out=integration/api --grpc_python_out=integration/api $(TEST_PROTOS)
	sed -i -E -e 's/^import (task_types_pb2) as /from shim.api import \1 as /' \
		-e 's/^import ([a-z_]+_pb2) as /from . import \1 as /' \
		integration/api/*_pb2*.py integration/api/*_pb2.pyi
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(CRI_API) --pyi_out=$(CRI_API) \
		--grpc_python_out=$(CRI_API) $(CRI_PROTO)
	sed -i -E 's/^import ([a-z_]+_pb2) as /from . import \1 as /' $(CRI_API)/*_pb2*.py*

bpf:
	$(MAKE) -C bpf

lint:
	$(VENV)/bin/ruff check shim tests integration conftest.py setup.py
	$(VENV)/bin/ruff format --check shim tests integration conftest.py setup.py
	$(VENV)/bin/mypy shim

unit: setup
	$(PY) -m pytest -q tests

integration: setup
	$(PY) -m pytest -q integration

# the CRI suite alone (also part of `integration` and `test`): both runtime handlers
cri: setup
	$(PY) -m pytest -q integration/cri

test: setup lint
	$(PY) -m pytest -q tests integration

demo: setup
	$(PY) -m integration.demo

bench: setup
	$(PY) -m integration.bench.bench $(BENCH_ARGS)

# only the bench's sandbox phase (a pod's sandbox through CRI on containerd 2.2.7: runc,
# embed, embed-shim); `make bench` runs it too
bench-sandbox: setup
	$(PY) -m integration.bench.bench --phases sandbox $(BENCH_ARGS)

# 1,000 create/start/exit/delete cycles (half with an exec); prints the before/after figures.
soak: setup
	EMBEDSHIM_SOAK_CYCLES=$${EMBEDSHIM_SOAK_CYCLES:-1000} $(PY) -m pytest -q -s integration/test_soak.py

# The live-daemon fuzz test, twenty times longer than in `make test`; prints the inputs tried.
fuzz: setup
	EMBEDSHIM_FUZZ_SCALE=$${EMBEDSHIM_FUZZ_SCALE:-20} $(PY) -m pytest -q -s integration/test_fuzz.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
