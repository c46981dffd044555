# The two commands: `make up` starts everything, `make test` runs the whole suite.
# Both build .venv from pyproject.toml when it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENGINES ?= 4
ENGINE ?= sim
ARGS ?=
# NATS_CLUSTER=3: a 3-node NATS cluster instead of one nats-server (unset: one server).
NATS_CLUSTER ?=
VLLM_VENV := .venv-vllm

.PHONY: up test unit integration e2e vllm-test vllm-env bench bench-llmd bench-autoscale bench-peers lint venv clean schema keda-stubs dashboards chromium console-screenshot helm-schemas

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Real vLLM (CPU) in its own venv, and the tiny model's random weights for it (idempotent).
vllm-env: $(STAMP)
	bash deploy/local/vllm-env.sh
	$(VLLM_VENV)/bin/python -m infermesh.libs.tinymodel --weights

up: $(STAMP) $(if $(filter vllm,$(ENGINE)),vllm-env)
	$(BIN)/infermesh up --engines $(ENGINES) --engine $(ENGINE) \
		$(if $(NATS_CLUSTER),--nats-cluster $(NATS_CLUSTER)) $(ARGS)

test: $(STAMP) vllm-env chromium
	$(BIN)/python -m pytest -q tests/unit tests/integration tests/e2e tests/vllm $(ARGS)

vllm-test: $(STAMP) vllm-env chromium
	$(BIN)/python -m pytest -q tests/vllm $(ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(ARGS)

e2e: $(STAMP) chromium
	$(BIN)/python -m pytest -q tests/e2e $(ARGS)

# Headless Chromium and its driver, Debian's packages, for the console's browser test
# (tests/e2e/test_console.py) and screenshot; installed once, when missing.
CHROMIUM_PACKAGES := chromium chromium-driver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES) || { \
			$(SUDO) apt-get update && \
			$(SUDO) apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES); }; }

# docs/img/console.png: the fleet console on 4 simulated engines under load (≈ 1 min).
console-screenshot: $(STAMP) chromium
	$(BIN)/python -m tests.e2e.screenshot_console docs/img/console.png

# The quick preset of `infermesh bench` (every scheduler profile on one workload, ≤ 3 min),
# then the component benchmarks in tests/bench.
bench: $(STAMP)
	$(BIN)/infermesh bench --preset quick --out .bench/quick
	$(BIN)/python -m pytest -q -s -m bench tests/bench $(ARGS)

bench-llmd: $(STAMP)
	$(BIN)/infermesh bench --preset llmd-kvcache-wins --out .bench/llmd-kvcache-wins $(ARGS)

# A compressed day (idle, ramp, peak, trough, idle) on fixed fleets and on the autoscaler from
# zero, engines taking 25 s (modelled) to start; ≈ 3.5 min (docs/bench.md).
bench-autoscale: $(STAMP)
	$(BIN)/infermesh bench --preset autoscale --out .bench/autoscale $(ARGS)

# Peer routers (sglang-router, vllm-router) next to our profiles, 3 repeats each
# (docs/bench.md): quick with every peer policy (≈ 13 min on 2 cores), then llmd-kvcache-wins
# with the peers' cache_aware policy only (≈ 40-60 min; every policy would take 1.5-2.5 h).
PEERS_STAMP := $(VENV)/.installed-peers

$(PEERS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[peers]'
	@touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(BIN)/infermesh bench --preset quick --peers sglang-router,vllm-router --repeat 3 \
		--out .bench/peers-quick $(ARGS)
	$(BIN)/infermesh bench --preset llmd-kvcache-wins --peers sglang-router,vllm-router \
		--peer-policies cache_aware --repeat 3 --out .bench/peers-llmd $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

schema: $(STAMP)
	$(BIN)/infermesh schema export docs/schema

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache

# The autoscaler's KEDA external-scaler stubs, from the proto beside them (committed; run this
# after changing the proto). grpcio-tools comes with the test extra.
KEDA := services/autoscaler/keda
keda-stubs: $(STAMP)
	rm -rf .keda-gen && mkdir -p .keda-gen
	$(BIN)/python -m grpc_tools.protoc -Iinfermesh/$(KEDA)=$(KEDA) --python_out=.keda-gen \
		--grpc_python_out=.keda-gen --pyi_out=.keda-gen infermesh/$(KEDA)/externalscaler.proto
	cp .keda-gen/infermesh/$(KEDA)/externalscaler_pb2*.py* $(KEDA)/
	rm -rf .keda-gen

# The Grafana dashboards (deploy/grafana/*.json) from deploy/grafana/dashboards.py.
dashboards: $(STAMP)
	$(BIN)/python deploy/grafana/dashboards.py

# The charts' values.schema.json (deploy/helm/*/) from the services' config classes.
helm-schemas: $(STAMP)
	$(BIN)/python deploy/helm/schema.py
