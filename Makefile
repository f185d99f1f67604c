# Needs only Python 3.11+ and pip: uv is bootstrapped into .tools/ when it is not on PATH.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := .tools/bin/uv
endif

.PHONY: setup demo test ui down validate bench bench-router bench-cost bench-proxy clean k8s-build k8s-up k8s-down k8s-status \
	neo4j-build neo4j-up neo4j-down neo4j-status aws-up aws-down aws-status
setup: .venv/.synced

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

demo: setup  ## set up, then take every sample intent to production
	.venv/bin/codemind demo

test: setup  ## set up, then run every test (PostgreSQL ones included)
	.venv/bin/python -m pytest

validate: setup
	.venv/bin/dagster definitions validate -m codemind_dagster.definitions

ui: setup
	.venv/bin/codemind ui

down: setup
	.venv/bin/codemind down

bench: setup
	.venv/bin/python benchmarks/pipeline.py

bench-router: setup
	UV=$(UV) .venv/bin/python benchmarks/router.py

bench-cost: setup
	.venv/bin/python benchmarks/cost_report.py

bench-proxy: setup
	.venv/bin/python benchmarks/proxy.py

.PHONY: bench-embeddings
bench-embeddings: setup  ## similar-intent retrieval per intent (model load, embed, store, query) vs planning
	.venv/bin/python benchmarks/embeddings.py

k8s-build: setup  ## build etcd and the Kubernetes control plane from the Go module proxy (cached)
	.venv/bin/python -m devcluster build

k8s-up: setup  ## start the clusters main (dev-staging, production) and dr; kubeconfig in $$CODEMIND_HOME/kube/config
	.venv/bin/python -m devcluster up

k8s-down: setup
	.venv/bin/python -m devcluster down

k8s-status: setup
	.venv/bin/python -m devcluster status

neo4j-build: setup  ## resolve Neo4j 5.26 (the test harness) from Maven Central, cached in ~/.cache/codemind/neo4j
	.venv/bin/python -m devservices.neo4j build

neo4j-up: setup  ## start Neo4j on a free Bolt port; prints the CODEMIND_NEO4J_* exports
	.venv/bin/python -m devservices.neo4j up

neo4j-down: setup
	.venv/bin/python -m devservices.neo4j down

neo4j-status: setup
	.venv/bin/python -m devservices.neo4j status

aws-up: setup  ## start moto's server (S3, Secrets Manager, Cost Explorer); prints the AWS_* exports
	.venv/bin/python -m devservices.moto up

aws-down: setup
	.venv/bin/python -m devservices.moto down

aws-status: setup
	.venv/bin/python -m devservices.moto status

.PHONY: monitoring-up monitoring-down monitoring-status
monitoring-up: setup  ## start Debian's Prometheus scraping every local environment; prints CODEMIND_PROMETHEUS_URL
	.venv/bin/python -m devservices.prometheus up

monitoring-down: setup
	.venv/bin/python -m devservices.prometheus down

monitoring-status: setup
	.venv/bin/python -m devservices.prometheus status

clean:
	rm -rf .venv .tools .codemind
