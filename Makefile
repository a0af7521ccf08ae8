# The two commands of the README, and the ones around them.
#   make deploy   set this machine up and start the reference system
#   make test     set up what the tests need and run them all
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# openssh-server and python3-docker: the hosts of molecule dual are made on this machine
# (scripts/dual_hosts.py), and what they find installed is what this machine has.
DEBIAN_PACKAGES := redis-server prometheus prometheus-alertmanager chromium chromium-driver \
	openssh-server python3-docker
PLAYBOOK := $(BIN)/ansible-playbook -i inventory/lab

.PHONY: deploy test lint unit molecule down status bench bench-all bench-runtime bench-deploy bench-deploy-dual bench-monitoring bench-ha bench-partition bench-workflows bench-security bench-load system docker local-up local-down

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@echo "installing Python packages into $(VENV)"
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[deploy,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

system:
	@scripts/ensure-packages.sh $(DEBIAN_PACKAGES)

docker:
	@scripts/ensure-docker.sh

# The main job: the whole system on the lab inventory (both machines on this Docker engine).
deploy: $(STAMP) system docker
	$(PLAYBOOK) site.yml
	@echo "next: make status (every instance), docker logs agentlink-<group> (a host's log),"
	@echo "      ansible-playbook site.yml -i inventory/dual (two real machines), make down"

down: $(STAMP) docker
	$(PLAYBOOK) playbooks/down.yml

status: $(STAMP)
	@$(PLAYBOOK) playbooks/verify.yml

# The same system as plain local processes, no Docker: agentlink up / down.
local-up: $(STAMP) system
	$(BIN)/agentlink up

local-down: $(STAMP)
	$(BIN)/agentlink down

lint: $(STAMP)
	$(BIN)/ruff check src tests bench library filter_plugins strategy_plugins roles scripts
	$(BIN)/mypy
	$(BIN)/yamllint -s .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-lint -q

unit: $(STAMP) system docker
	$(BIN)/pytest

# Scenario default: deploy on the lab, converge again (must change nothing), verify, destroy.
# Scenario failover: deploy, then faults under load (tests/failover), destroy.
# Scenario upgrade: deploy, then rolling upgrades and a rollback under load (tests/upgrade).
# Scenario dual: inventory/dual on three hosts made here (network and mount namespaces, own
#   dockerd and sshd), deployed over SSH, then the same tests and the dual-only ones.
# A failed scenario's failing tests are printed last, after its destroy.
molecule: $(STAMP) system docker
	@mkdir -p build
	@for scenario in default failover upgrade dual; do \
	  rm -f build/verify-$$scenario.log; \
	  PATH="$(abspath $(BIN)):$$PATH" $(BIN)/molecule test -s $$scenario && continue; \
	  echo "molecule $$scenario failed; its tests said:"; \
	  grep -hE '^(FAILED|ERROR) |[0-9]+ (passed|failed)' build/verify-$$scenario.log || true; \
	  exit 2; \
	done

test: lint unit molecule

bench-runtime: $(STAMP) system
	$(BIN)/python bench/runtime.py

bench-deploy: $(STAMP) system docker
	$(BIN)/python bench/deploy.py

# The same on two machines over SSH: the dual harness's hosts, made anew (left deployed;
# scripts/dual_hosts.py down removes them).
bench-deploy-dual: $(STAMP) system docker
	$(BIN)/python bench/deploy.py --dual

# Needs the lab deployed (bench-deploy leaves it so): monitoring memory, scrapes, detection.
bench-monitoring: $(STAMP) docker
	$(BIN)/python bench/monitoring.py

# Needs the lab deployed: a rolling upgrade under load, replica and Redis primary deaths.
bench-ha: $(STAMP) docker
	$(BIN)/python bench/ha.py

# Needs the lab deployed: the highest rate it holds with p99 <= 20 ms and nothing failed.
bench-load: $(STAMP) docker
	$(BIN)/python bench/ceiling.py

# Needs an inventory deployed (the lab by default; INVENTORY=molecule/dual/inventory with the
# dual harness's hosts up): the Redis primary's machine cut off 22 s, a load on each side.
bench-partition: $(STAMP) docker
	$(BIN)/python bench/partition.py --inventory $(or $(INVENTORY),inventory/lab)

# The roadmap's key metrics on the deployed lab, beside the old way in the same run; writes
# docs/benchmarks.json and the key-metrics section of docs/benchmarks.md. Leaves the lab deployed.
bench: $(STAMP) system docker
	$(BIN)/python bench/keymetrics.py

# Needs the lab deployed: workflow init time, throughput, and 10,000 workflows under a
# coordinator kill and a machine cut; writes the workflows section of docs/benchmarks.md.
bench-workflows: $(STAMP) docker
	$(BIN)/python bench/workflows.py

# No lab needed: the round trip with CURVE on vs off, and hostile input at a real agent host;
# writes the security section of docs/benchmarks.md.
bench-security: $(STAMP) system
	$(BIN)/python bench/security.py

# Every figure of docs/benchmarks.md (bench-deploy --cold is run by hand: it removes all images).
bench-all: bench bench-runtime bench-deploy bench-monitoring bench-ha bench-partition bench-workflows bench-security bench-load
