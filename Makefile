# conveyor's entry points. `make test` works on a fresh clone as root: it creates .venv,
# installs and starts the servers the tox envs need, and runs every tox env in parallel.
#
#   make test      every tox env (faults, lint, type, unit, memory, sqla-*, redis, amqp, mongodb, ...);
#                  TOX_ENVS=unit,lint make test runs some
#   make demo      run `conveyor demo` on the embedded default (SQLite in ./.conveyor)
#   make bench     conveyor against Celery 5.7 on the same servers (docs/performance.md);
#                  BENCH_ARGS="--quick --only redis,amqp" make bench runs less
#   make lint      ruff check + ruff format --check, in .venv
#   make type      mypy --strict, in .venv
#   make services  install/start every server the tests can use (SERVICES="redis mongodb")
#   make venv      create .venv with conveyor[dev] (editable); redone when pyproject.toml changes
#   make clean     remove build products and caches (not .venv)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.conveyor-dev-installed

# Servers the tox envs in tox.ini need. Add one here when its env lands in tox.ini.
TEST_SERVICES := postgres mariadb redis rabbitmq memcached mongodb
SERVICES ?= postgres mariadb redis rabbitmq memcached mongodb
# The soak moves this many tasks per broker in `make test` (20,000 keeps the run inside its
# 30-minute budget on 2 cores); `CONVEYOR_SOAK_TASKS=100000 make test` is the full soak of
# issue 8, whose figures docs/reliability.md reports.
export CONVEYOR_SOAK_TASKS ?= 20000
# tox envs to run (comma-separated); empty means tox.ini's env_list.
TOX_ENVS ?=
# 2 cores: two envs at a time; each SQL/memory env also runs pytest-xdist with 2 workers,
# which overlaps waiting on servers rather than competing for CPU.
TOX_PARALLEL ?= auto
# A hard stop well inside CI's 90 minutes, in case something hangs past pytest-timeout.
TEST_TIMEOUT ?= 40m

# Servers `make bench` measures; arguments for bench/run.py.
BENCH_SERVICES := redis rabbitmq postgres mongodb
BENCH_ARGS ?=
# Hard stop for one bench run: every measured phase is capped (12 s), so a full run takes
# about 40 minutes on an idle 2-core machine (SQLite phases wait on Celery) and longer when busy.
BENCH_TIMEOUT ?= 90m

.PHONY: test demo bench lint type services venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing conveyor[dev] (editable) into $(VENV)"
	@# -qq: pip's warnings about this machine's extra local indexes are noise.
	$(BIN)/python -m pip install -qq --editable '.[dev]'
	@touch $@

test: venv
	@start=$$SECONDS; \
	scripts/services.sh ensure $(TEST_SERVICES); \
	rm -rf .tox/reports; \
	status=0; \
	CONVEYOR_REQUIRE_SERVICES=1 timeout --kill-after=60 $(TEST_TIMEOUT) \
		$(BIN)/tox run-parallel --parallel $(TOX_PARALLEL) \
		$(if $(CI),--parallel-no-spinner) $(if $(TOX_ENVS),-e $(TOX_ENVS)) \
		|| status=$$?; \
	echo "make test: tox exited with status $$status after $$((SECONDS - start)) s"; \
	scripts/test-summary.sh; \
	exit $$status

demo: venv
	$(BIN)/conveyor demo

bench: venv
	@# -qq: pip's warnings about this machine's extra local indexes are noise.
	$(BIN)/python -m pip install -qq --editable '.[dev,bench]'
	scripts/services.sh ensure $(BENCH_SERVICES)
	timeout --kill-after=60 $(BENCH_TIMEOUT) $(BIN)/python -m bench.run $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

type: venv
	$(BIN)/mypy

services:
	scripts/services.sh ensure $(SERVICES)

clean:
	rm -rf .tox build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -rf ./*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
