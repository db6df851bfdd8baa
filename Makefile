# kubeml: `make demo` and `make test` are the whole set-up on a fresh machine.
#
# Heavy, reusable things live outside the repo in $(KUBEML_CACHE): the uv tool venv,
# uv's wheel cache, and the control-plane binaries built from Go modules.

SHELL := /bin/bash
PYTHON ?= python3
KUBEML_CACHE ?= $(HOME)/.cache/kubeml
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
UV := $(KUBEML_CACHE)/tools/bin/uv
# The slowest tests are listed at the end of every run: the suite has a time budget.
PYTEST_ARGS ?= --durations=30

.PHONY: demo test install lock layers policy policy-assets cluster-assets images kafka-assets prometheus-assets postgres-assets test-unit test-integration test-e2e clean help

help:
	@echo "make demo            install, then run the whole pipeline locally (kubeml run)"
	@echo "make test            install, build test assets, run every test tier"
	@echo "make cluster-assets  build the control-plane binaries and CRDs into $(KUBEML_CACHE)"
	@echo "make images          build the operator, server and runtime images (buildah) into $(KUBEML_CACHE)/images"
	@echo "make kafka-assets    fetch the Kafka broker jars (test broker) into $(KUBEML_CACHE)"
	@echo "make prometheus-assets  install the prometheus binary the rollout tests start"
	@echo "make postgres-assets    install PostgreSQL's server binaries (the tracking server's tests)"
	@echo "make layers          check the import layering (.importlinter); make test checks it too"
	@echo "make policy          scan the chart, overlays and generated manifests with kube-score (policy/waivers.yaml)"
	@echo "make policy-assets   build the pinned kube-score into $(KUBEML_CACHE)"

$(UV):
	$(PYTHON) -m venv $(KUBEML_CACHE)/tools
	$(KUBEML_CACHE)/tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The stamp depends on the inputs of the install: change either file and it reinstalls.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt | $(UV)
	test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -r requirements/constraints.txt
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Re-resolve the pinned versions after changing requirements/requirements.in.
lock: | $(UV)
	$(UV) pip compile requirements/requirements.in --python-version 3.11 --custom-compile-command "make lock" \
		-o requirements/constraints.txt

demo: install
	$(VENV)/bin/kubeml run
	@echo
	@echo "The model is being served. Try:"
	@echo "  curl -s -H 'Content-Type: application/json' -d @examples/digit-v2.json http://127.0.0.1:8080/v2/models/digits-cnn/infer"
	@echo "  $(VENV)/bin/kubeml serve status      # list served models"
	@echo "  $(VENV)/bin/kubeml serve stop        # stop them"

BUILD_CLUSTER_ASSETS := bash hack/cluster/build.sh
FETCH_KAFKA := bash hack/kafka/fetch.sh >/dev/null
INSTALL_POLICY := bash hack/policy/install.sh >/dev/null

cluster-assets:
	$(BUILD_CLUSTER_ASSETS)

# images/*.Containerfile on a Debian base, with buildah; cached by content, loaded into the
# real node when one runs. Needs root (make test skips it without).
images: install
	bash hack/images/build.sh

# The rollout-analysis tests start their own Prometheus; this only installs the binary.
prometheus-assets:
	bash hack/prometheus/install.sh

# The shared MLflow tracking server's tests run it on their own PostgreSQL; this only installs
# Debian's server binaries (the package's own cluster never starts).
postgres-assets:
	bash hack/postgres/install.sh

# The Kafka broker of the integration tests runs from Maven jars (needs Java 17 and mvn).
kafka-assets:
	$(FETCH_KAFKA)

# The policy scanner (kube-score), built from its Go module into $(KUBEML_CACHE) once per version.
policy-assets:
	$(INSTALL_POLICY)

# The policy scan alone: the chart, the overlays and the manifests kubeml generates, scored by
# kube-score; fails on a high finding not waived in policy/waivers.yaml, or a stale waiver.
policy: install policy-assets
	BUILD_ONLY="helm kubectl" bash hack/cluster/build.sh >/dev/null
	$(PY) -m pytest tests/unit/test_policy_scan.py tests/unit/test_policy_checker.py $(PYTEST_ARGS)

# The tests run the operator image (the chart) and the runtime image (KubeRay training) on
# the real node; both are cached by content, so a warm run builds nothing. On a cold machine
# the images (mostly downloading and unpacking wheels) build beside the Go builds, which
# saves about the image build's length; apt-get runs first and alone, since two at once
# would fight over dpkg's lock. (The recipe calls the asset scripts itself, not $(MAKE), so
# that `make -n test` only prints.)
IMAGES_LOG := $(KUBEML_CACHE)/images/make-test.log
test: install prometheus-assets postgres-assets
	@if [ "$$(id -u)" = 0 ]; then bash hack/cluster/host-packages.sh && bash hack/cluster/host-packages.sh buildah mmdebstrap; fi
	@mkdir -p $(dir $(IMAGES_LOG)); \
	setsid bash hack/images/build.sh --if-root operator runtime >$(IMAGES_LOG) 2>&1 & images=$$!; \
	if ! { $(BUILD_CLUSTER_ASSETS) && $(FETCH_KAFKA) && $(INSTALL_POLICY); }; then \
		kill -- -$$images 2>/dev/null; wait $$images; exit 1; fi; \
	echo "[images] waiting for the image build (log: $(IMAGES_LOG))"; \
	if ! wait $$images; then tail -n 40 $(IMAGES_LOG); echo "the image build failed; log: $(IMAGES_LOG)" >&2; exit 1; fi; \
	cat $(IMAGES_LOG)
	$(PY) -m pytest $(PYTEST_ARGS)

# The import-layering contracts of .importlinter, on the package laid out as installed.
layers: install
	$(PY) -m kubeml.testing.layers

test-unit: install policy-assets
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

test-integration: install cluster-assets prometheus-assets postgres-assets kafka-assets
	bash hack/images/build.sh --if-root operator runtime
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-e2e: install
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

clean:
	-$(VENV)/bin/kubeml serve stop 2>/dev/null
	rm -rf .kubeml .pytest_cache
