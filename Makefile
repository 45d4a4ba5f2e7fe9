# Camera broker: every operator action is a target here (see README "Ops runbook").
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BROKER := $(VENV)/bin/broker
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv run demo test lint proto certs db-migrate enroll-token factory-batch revoke-device revoke-app devices audit-verify crl rotate-server-cert rotate-intermediate rotate-root retire-root rotate-token-key rotation-status fleet-audit bench cluster rolling-restart clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip >&2
	@$(PY) -m pip install --quiet -e '.[dev]' >&2
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the broker with dev extras

run: $(STAMP) ## [STORE=postgresql://...] serve on 127.0.0.1:8444/:8443/:8445; creates the dev PKI first
	$(BROKER) serve --init-pki $(if $(STORE),--store "$(STORE)",)

demo: $(STAMP) ## the whole story in one process: enroll, claim, share, watch, stranger denied, revoke live, access log
	$(PY) -m broker.dev.demo

test: $(STAMP) ## lint, type-check, the whole suite; the integration suite again on PostgreSQL if configured
	$(PY) -m ruff check broker tests bench tools
	$(PY) -m ruff format --check broker tests bench tools
	$(PY) -m mypy broker bench tests/helpers.py tests/conftest.py
	$(PY) -m pytest -q -n 2
	@if [ -n "$$BROKER_TEST_POSTGRES" ]; then \
		echo "integration suite again, every broker on a fresh PostgreSQL database"; \
		BROKER_TEST_BACKEND=postgres $(PY) -m pytest -q -n 2 tests/integration; \
	else \
		echo "BROKER_TEST_POSTGRES is not set: the integration suite ran on SQLite only"; \
	fi

lint: $(STAMP) ## ruff (check and format) + mypy only
	$(PY) -m ruff check broker tests bench tools
	$(PY) -m ruff format --check broker tests bench tools
	$(PY) -m mypy broker bench tests/helpers.py tests/conftest.py

proto: $(STAMP) ## regenerate broker/_proto from protos/
	$(PY) tools/genproto.py

certs: $(STAMP) ## create the dev PKI in certs/ (idempotent: never replaces a key)
	@$(BROKER) ca init

enroll-token: $(STAMP) ## DEVICE=<id> [TTL=<s>]: one-time token; printed alone on the last line
	@test -n "$(DEVICE)" || { echo "usage: make enroll-token DEVICE=<device_id>" >&2; exit 2; }
	@$(BROKER) device token "$(DEVICE)" --ttl "$(or $(TTL),0)"

factory-batch: $(STAMP) ## N=<n>: birth certificates for n simulated cameras in certs/factory-batch/
	@test -n "$(N)" || { echo "usage: make factory-batch N=<count>" >&2; exit 2; }
	@$(BROKER) factory batch "$(N)"

revoke-device: $(STAMP) ## DEVICE=<id> [REASON=...]: revoke via the running broker; ends its streams
	@test -n "$(DEVICE)" || { echo "usage: make revoke-device DEVICE=<device_id>" >&2; exit 2; }
	@$(BROKER) admin revoke-device "$(DEVICE)" --reason "$(or $(REASON),operator request)"

revoke-app: $(STAMP) ## APP=<app_id> [REASON=...]: revoke an app instance via the running broker
	@test -n "$(APP)" || { echo "usage: make revoke-app APP=<app_id>" >&2; exit 2; }
	@$(BROKER) admin revoke-app "$(APP)" --reason "$(or $(REASON),operator request)"

crl: $(STAMP) ## write certs/crl.pem (one CRL per trusted issuing CA)
	@$(BROKER) ca crl

rotate-server-cert: $(STAMP) ## new broker certificate, picked up without a restart
	@$(BROKER) ca rotate-server-cert

rotate-intermediate: $(STAMP) ## new issuing CA under the same root; the old one stays trusted
	@$(BROKER) ca rotate-intermediate

rotate-root: $(STAMP) ## new root cross-signed by the old; bundle with both pushed to cameras
	@$(BROKER) ca rotate-root

retire-root: $(STAMP) ## [FORCE=1] drop the old root; refuses while cameras lag
	@$(BROKER) ca retire-root $(if $(FORCE),--force,)

rotate-token-key: $(STAMP) ## new session-token signing key; old key published until its tokens expire
	@$(BROKER) ca rotate-token-key

rotation-status: $(STAMP) ## how many cameras hold the current trust bundle
	@$(BROKER) ca rotation-status

devices: $(STAMP) ## list devices with state and online status
	@$(BROKER) device list

fleet-audit: $(STAMP) ## [JSON=1] [SINCE=<s>] clones, key reuse, revoked callers, expiring offline certs, relay alarms, session fan-out
	@$(BROKER) fleet-audit $(if $(JSON),--json,) $(if $(SINCE),--since "$(SINCE)",)

audit-verify: $(STAMP) ## [STORE=...] check the audit log's hash chain
	@$(if $(STORE),BROKER_STORE="$(STORE)" ,)$(BROKER) audit verify

db-migrate: $(STAMP) ## [STORE=postgresql://...] bring the store's schema up to date (also done at start)
	@$(BROKER) db migrate $(if $(STORE),--store "$(STORE)",)

bench: $(STAMP) ## enrollment benchmark (prints medians)
	$(PY) -m bench.enroll

cluster: $(STAMP) ## [N=3] [STORE=postgresql://...] [DRAIN=<s>] N replicas on the local PostgreSQL, foreground
	$(PY) tools/cluster.py start --replicas "$(or $(N),3)" --store "$(or $(STORE),postgresql://postgres@127.0.0.1:5432/broker)" $(if $(DRAIN),--drain-window "$(DRAIN)",)

rolling-restart: $(STAMP) ## [PAUSE=<s>] drain and restart the running local cluster one replica at a time
	$(PY) tools/cluster.py rolling-restart $(if $(PAUSE),--pause "$(PAUSE)",)

clean: ## remove the venv and caches (keeps certs/ and var/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
