# The two commands of the README, and the ones around them.
#   make deploy   set this machine up and start the reference system
#   make test     set up what the tests need and run them all
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
DEBIAN_PACKAGES := redis-server

.PHONY: deploy test lint unit down status bench bench-runtime system

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@echo "installing Python packages into $(VENV)"
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

system:
	@scripts/ensure-packages.sh $(DEBIAN_PACKAGES)

deploy: $(STAMP) system
	$(BIN)/agentlink validate
	$(BIN)/agentlink up
	$(BIN)/agentlink status
	@echo "logs: .agentlink/logs/  status: $(BIN)/agentlink status  stop: make down"

down: $(STAMP)
	$(BIN)/agentlink down

status: $(STAMP)
	$(BIN)/agentlink status

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

unit: $(STAMP) system
	$(BIN)/pytest

test: lint unit

bench-runtime: $(STAMP) system
	$(BIN)/python bench/runtime.py

bench: bench-runtime
