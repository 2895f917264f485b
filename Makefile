# The project's commands, as CI runs them (.ci/run runs them all from a clean clone).
# `make help` lists the targets. Run them in the environment the README's set-up made.

PYTHON ?= python
# Folders with tests of their own: `make test-collector` runs tests/collector.
COMPONENTS := $(filter-out fixtures helpers __pycache__,$(notdir $(patsubst %/,%,$(wildcard tests/*/))))
COMPONENT_TESTS := $(addprefix test-,$(COMPONENTS))
# `make test COMPONENT=collector` is the same as `make test-collector`.
COMPONENT ?=
# Passed on to pytest, e.g. `make test-quick PYTEST_ARGS="-x -k grpc"`.
PYTEST_ARGS ?=

.PHONY: help install test test-quick lint format typecheck imports extras deadcode precommit ci $(COMPONENT_TESTS)

help: ## this list
	@grep -E '^[$$()A-Za-z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/^$$(COMPONENT_TESTS): test-%:/test-FOLDER:/' \
		| awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

install: ## the README's set-up: the CPU build of torch first, then everything, editable
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[all]"

test: ## the whole suite, as CI and the README run it (COMPONENT=name for one folder)
	$(PYTHON) -m pytest -q $(if $(COMPONENT),tests/$(COMPONENT)) $(PYTEST_ARGS)

test-quick: ## without the tests marked slow (COMPONENT=name for one folder)
	$(PYTHON) -m pytest -q -m "not slow" $(if $(COMPONENT),tests/$(COMPONENT)) $(PYTEST_ARGS)

$(COMPONENT_TESTS): test-%: ## one folder's tests, slow ones included: make test-collector
	$(PYTHON) -m pytest -q tests/$* $(PYTEST_ARGS)

lint: ## ruff: the lint rules and the formatting, checked
	ruff check .
	ruff format --check .

format: ## ruff: fix what the lint rules can fix, then format
	ruff check --fix .
	ruff format .

typecheck: ## mypy over the package as Python imports it
	.ci/typecheck

imports: ## the import contract: DESIGN.md's dependency direction (import-linter)
	.ci/imports

extras: ## each extra, alone in a fresh environment, installs what its commands import
	$(PYTHON) .ci/extras.py

deadcode: ## vulture's report of unused code (not a gate: read it, then remove or whitelist)
	vulture

precommit: lint typecheck imports test-quick ## the checks to run before every commit

ci: ## everything CI runs, from a fresh environment (slow: installs, then the whole suite)
	bash .ci/run
