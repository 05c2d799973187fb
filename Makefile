# voucher-bridge: `make demo` shows it working end to end, `make test` runs every test.
# Both install what they need (uv, the Python dependencies, the Kafka jars) on first use.

SHELL := /bin/bash
UV_VERSION := 0.13.8
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/var/tools/bin/uv)
KAFKA := deploy/kafka/kafka.sh

.PHONY: help sync kafka-up kafka-down topics demo run test test-unit lint format asyncapi sandbox clean bench bench-quick soak image image-sandbox base-images

help:
	@echo "make demo        the service end to end: broker, sandbox, service, two POS sessions"
	@echo "make demo KEEP=1 the same, left running (until Ctrl-C) for the operator console"
	@echo "make test        lint, unit and integration tests against a real Kafka broker"
	@echo "make run         the service in the foreground (settings from the environment)"
	@echo "make kafka-up    start the local Kafka broker (127.0.0.1:9092); make kafka-down"
	@echo "make sandbox     the eVOUCHER sandbox on 127.0.0.1:8081"
	@echo "make image       the service image voucher-bridge:0.1.0 (podman or docker); make image-sandbox"

$(CURDIR)/var/tools/bin/uv:
	python3 -m venv var/tools
	var/tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: pyproject.toml uv.lock contracts/pyproject.toml sandboxes/pyproject.toml | $(UV)
	$(UV) sync --frozen
	@touch $@

sync: .venv/.synced

kafka-up:
	@$(KAFKA) up

kafka-down:
	@$(KAFKA) down

topics: sync kafka-up
	$(UV) run voucher-bridge topics

# Starts the broker only if none runs, and stops it afterwards only if it started it.
demo: sync
	@if $(KAFKA) status >/dev/null 2>&1; then started=0; else started=1; fi; \
	$(KAFKA) up || exit 1; \
	$(UV) run voucher-sandbox demo $(if $(KEEP),--keep,); rc=$$?; \
	if [ $$started = 1 ]; then $(KAFKA) down; fi; \
	exit $$rc

run: sync
	$(UV) run voucher-bridge run

sandbox: sync
	$(UV) run voucher-sandbox evoucher

lint: sync
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format: sync
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

test-unit: sync
	$(UV) run pytest tests/unit -q

# The integration tests start the local broker themselves when none runs (tests/support/kafka.py).
# Then the guarantee tests again with two worker processes (WORKERS=2, workers/pool.py): the
# crash, ordering, commit and revocation, every-record-ends and honest-outcome tests, and the
# ledger's (a till's bill across settling, which runs in the service's process).
WORKER_TESTS = tests/integration/test_crash.py tests/integration/test_concurrency.py \
	tests/integration/test_every_record_ends.py tests/integration/test_honest_outcomes.py \
	tests/integration/test_exactly_once.py tests/integration/test_ledger.py
# The broker and PostgreSQL that the tests start (when none runs) are stopped at the end, pass
# or fail; those already running are left as they were. `make test KEEP=1` leaves them running,
# for the next run to reuse.
test: lint
	@kafka_was_up=0; postgres_was_up=0; status=0; \
	deploy/kafka/kafka.sh status >/dev/null 2>&1 && kafka_was_up=1; \
	deploy/postgres/pg.sh status >/dev/null 2>&1 && postgres_was_up=1; \
	$(UV) run pytest -q && WORKERS=2 $(UV) run pytest -q $(WORKER_TESTS) || status=$$?; \
	if [ "$(KEEP)" != 1 ]; then \
	  [ $$kafka_was_up = 1 ] || deploy/kafka/kafka.sh down >/dev/null 2>&1 || true; \
	  [ $$postgres_was_up = 1 ] || deploy/postgres/pg.sh down >/dev/null 2>&1 || true; \
	fi; \
	exit $$status

# Images (deploy/images/): podman or docker, whichever is installed. Where no base image can
# be pulled, the podman build first makes one from Debian's packages (base-images, mmdebstrap);
# an image whose inputs and commit have not changed is not built again (FORCE=1 builds anyway).
image:
	@deploy/images/build.sh service

image-sandbox:
	@deploy/images/build.sh sandbox

base-images:
	@deploy/images/base.sh all

asyncapi: sync
	$(UV) run voucher-bridge asyncapi --out contracts/asyncapi.json

clean:
	-$(KAFKA) down
	rm -rf var/kafka/data var/demo .pytest_cache .mypy_cache .ruff_cache

# The benchmark (bench/README.md): voucher-bridge, Confluent's Parallel Consumer (a Java peer
# the bench builds with Maven on first use; skipped without Java 17+ or Maven), a naive
# FastStream subscriber and a bare aiokafka loop on the real broker and the sandbox; a table,
# bench/results/*.json and *.png.
.PHONY: bench bench-quick
bench: sync
	$(UV) run python -m bench.run

bench-quick: sync
	$(UV) run python -m bench.run --quick

soak: sync
	$(UV) run python -m bench.soak
