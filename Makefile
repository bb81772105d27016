# conveyor's entry points. `make test` works on a fresh clone as root: it creates .venv,
# installs and starts the servers the tox envs need, and runs every tox env in parallel.
# Every install is pinned by constraints.txt (the lock; why a constraints file: scripts/lock.py).
#
#   make test      every tox env (faults, lint, type, unit, memory, sqla-*, redis, amqp, mongodb, ...);
#                  TOX_ENVS=unit,lint make test runs some
#   make test-latest  the same envs unlocked, with the newest releases, in fresh envs under
#                  .tox/latest: shows upstream drift early (README: when to run it)
#   make lock      rewrite constraints.txt after pyproject.toml or tox.ini changed their
#                  dependencies (keeps the pins that still fit); make lock-upgrade: newest releases
#   make demo      run `conveyor demo` on the embedded default (SQLite in ./.conveyor)
#   make bench     conveyor against Celery 5.7 on the same servers (docs/performance.md);
#                  BENCH_ARGS="--quick --only redis,amqp" make bench runs less
#   make lint      ruff check + ruff format --check, in .venv
#   make type      mypy --strict, in .venv
#   make services  install/start every server the tests can use (SERVICES="redis mongodb")
#   make venv      create .venv with conveyor[dev] (editable) at the locked versions; redone
#                  when pyproject.toml or constraints.txt changes
#   make clean     remove build products and caches (not .venv)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.conveyor-dev-installed
# The lock: pip reads it with -c here, tox's envs through PIP_CONSTRAINT/UV_CONSTRAINT (tox.ini).
LOCK := constraints.txt

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

.PHONY: test test-latest lock lock-upgrade check-lock demo bench lint type services venv clean

venv: $(STAMP)

# pip, setuptools and wheel come from the lock first, then conveyor is built with those
# (--no-build-isolation: an isolated build env would fetch the newest setuptools instead).
# The last step proves the venv holds exactly the locked versions (pip freeze vs the lock).
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) scripts/lock.py check
	@test -x $(BIN)/python || { echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing conveyor[dev] (editable) into $(VENV), pinned by $(LOCK)"
	@# -qq: pip's warnings about this machine's extra local indexes are noise.
	$(BIN)/python -m pip install -qq --constraint $(LOCK) pip setuptools wheel
	$(BIN)/python -m pip install -qq --constraint $(LOCK) --no-build-isolation --editable '.[dev]'
	$(BIN)/python scripts/lock.py verify
	@touch $@

# Fails (before anything is installed or run) when pyproject.toml or tox.ini changed their
# dependencies since constraints.txt was written: run `make lock` and commit the result.
check-lock:
	@if [[ -x $(BIN)/python ]]; then $(BIN)/python scripts/lock.py check; \
	else $(PYTHON) scripts/lock.py check; fi

# uv resolves; the uv used is the one the lock pins (so the same uv writes the same lock).
lock lock-upgrade:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq $(if $(wildcard $(LOCK)),--constraint $(LOCK)) uv
	UV=$(BIN)/uv $(BIN)/python scripts/lock.py write $(if $(filter lock-upgrade,$@),--upgrade)

# `make test` runs the envs from the lock in .tox; `make test-latest` runs the same envs
# unlocked (CONVEYOR_CONSTRAINTS=/dev/null, read by tox.ini) in fresh envs (--recreate) under
# their own work dir, so the locked envs stay as they are. tox itself (in .venv) stays locked.
test: TOX_WORKDIR := .tox
test-latest: TOX_WORKDIR := .tox/latest
test-latest: TOX_ENV_VARS := CONVEYOR_CONSTRAINTS=/dev/null
test-latest: TOX_OPTS := --recreate
test: check-lock
test test-latest: venv
	@start=$$SECONDS; \
	scripts/services.sh ensure $(TEST_SERVICES); \
	rm -rf $(TOX_WORKDIR)/reports; \
	status=0; \
	$(TOX_ENV_VARS) CONVEYOR_REQUIRE_SERVICES=1 timeout --kill-after=60 $(TEST_TIMEOUT) \
		$(BIN)/tox run-parallel --workdir $(TOX_WORKDIR) $(TOX_OPTS) --parallel $(TOX_PARALLEL) \
		$(if $(CI),--parallel-no-spinner) $(if $(TOX_ENVS),-e $(TOX_ENVS)) \
		|| status=$$?; \
	echo "make $@: tox exited with status $$status after $$((SECONDS - start)) s"; \
	scripts/test-summary.sh $(TOX_WORKDIR)/reports; \
	if [[ $@ == test-latest ]]; then \
		echo "==== newest releases that differ from $(LOCK) (any env) ===="; \
		cat $(TOX_WORKDIR)/reports/*.drift 2>/dev/null | sed 's/^[^:]*: //' | sort -u \
			| grep . || echo "(none: the lock holds the newest releases)"; \
	fi; \
	exit $$status

demo: venv
	$(BIN)/conveyor demo

bench: venv
	@# -qq: pip's warnings about this machine's extra local indexes are noise.
	$(BIN)/python -m pip install -qq --constraint $(LOCK) --no-build-isolation --editable '.[dev,bench]'
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
