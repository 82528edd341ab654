# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := rag_service operator/embedshift_operator

.PHONY: all venv test lint typecheck imports pytest prometheus helm chromium crd observability demo \
	bench dashboard-screenshot clean image image-tools image-test

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check rag_service operator tests benchmarks examples
	$(BIN)/ruff format --check rag_service operator tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict $(PACKAGES)
	$(BIN)/mypy --strict tests/operator/kube tests/operator/e2e tests/cluster tests/kubelet.py \
		tests/pod_network.py tests/kube_cluster.py tests/test_kubelet.py tests/api_calls.py \
		tests/api_recorder.py

imports: $(STAMP)
	$(BIN)/lint-imports

# Debian's prometheus (server + promtool) for the tests; a no-op once /usr/bin/prometheus exists.
prometheus:
	scripts/install-prometheus.sh

# A pinned helm (and kubectl) in .venv/tools for the chart tests; a no-op once installed.
helm: $(STAMP)
	scripts/install-helm.sh

# Debian's chromium, headless, for the dashboard page's browser test; a no-op once installed.
chromium:
	scripts/install-chromium.sh

# EMBEDSHIFT_REQUIRE_REAL=1: a missing real part (PostgreSQL, Prometheus, ...) fails, never skips.
# `image` first: tests/image runs the built image (a no-op when the sources did not change;
# about 3 minutes from nothing, Debian's base included).
pytest: $(STAMP) prometheus helm chromium image
	EMBEDSHIFT_REQUIRE_REAL=1 EMBEDSHIFT_IMAGE_UNDER_TEST=$(IMAGE) $(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck imports pytest

# Regenerate crds/ (and the chart's copy) from the models in embedshift_operator.resource. Not part of `test`: a test
# fails when the checked-in CRD is stale, so a model change without this is caught, not hidden.
crd: $(STAMP)
	$(BIN)/python -m embedshift_operator.crd
	$(BIN)/python -m embedshift_operator.crd charts/embedshift/crds/embeddingmigrations.embedshift.io.yaml

# Regenerate the chart's alert rules and Grafana dashboard from rag_service/criteria.py and the
# operator's metrics. Like crd: not part of `test`, a test fails when the checked-in files are stale.
observability: $(STAMP)
	$(BIN)/python -m embedshift_operator.observability

# The whole mission on this machine in about 3 minutes: re-embed, verify, 10 → 100 % gated by a
# real Prometheus, an automatic rollback when v2 breaks, a retry by editing the manifest.
demo: $(STAMP) prometheus
	$(BIN)/python examples/demo.py

bench: $(STAMP) prometheus
	$(BIN)/python benchmarks/backfill.py
	$(BIN)/python benchmarks/ratelimit.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/emergency.py
	$(BIN)/python benchmarks/decisions.py
	$(BIN)/python benchmarks/rollback.py
	$(BIN)/python benchmarks/operator.py

# Refresh docs/dashboard.png from the browser test (a real service, real traffic, headless Chromium).
dashboard-screenshot: $(STAMP) chromium
	EMBEDSHIFT_REQUIRE_REAL=1 EMBEDSHIFT_DASHBOARD_SCREENSHOT=docs/dashboard.png \
		$(BIN)/python -m pytest -q tests/rag_service/test_dashboard_page.py -k apis_report

# The one image (Dockerfile) built here without a Docker engine or a registry: buildah on a
# Debian bookworm base made by debootstrap (cached as $(BASE_IMAGE) in containers-storage, vfs).
IMAGE ?= localhost/embedshift:latest
BASE_IMAGE ?= localhost/embedshift-base:bookworm-python3.11

image-tools:
	scripts/install-image-tools.sh

image: image-tools
	BASE_IMAGE=$(BASE_IMAGE) scripts/image-base.sh
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) scripts/build-image.sh

# The image's tests alone (also part of `make test`): podman runs it read-only as uid 65532;
# --help, the Jobs' commands, `serve` healthy against a real PostgreSQL.
image-test: $(STAMP) image
	EMBEDSHIFT_REQUIRE_REAL=1 EMBEDSHIFT_IMAGE_UNDER_TEST=$(IMAGE) $(BIN)/python -m pytest tests/image $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .demo
