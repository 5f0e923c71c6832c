# The only entry point: the README and CI use these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/jobwire/v1/*.proto)
STAMP := $(VENV)/.installed
# The browser client: npm packages, generated TypeScript, the Vite build.
WEB_STAMP := web/node_modules/.installed
WEB_GEN := web/src/gen
WEB_SOURCES := $(shell find web/src web/public -type f 2>/dev/null) web/index.html web/vite.config.ts web/tsconfig.json
GOOGLE_API_PROTOS := google/api/annotations.proto google/api/http.proto google/api/httpbody.proto

.PHONY: install gen check-gen lint typecheck test run images docker browser web web-typecheck postgres deploy-envoy bench profile chaos clean

# A virtualenv at the repo root with jobwire (editable) and its dev tools.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# npm packages of web/ exactly as package-lock.json pins them.
$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $(WEB_STAMP)

# Regenerate gen/ (Python messages, gRPC stubs, mypy stubs, descriptor set, OpenAPI document) and
# web's TypeScript (protoc-gen-es, run by the same protoc) from proto/.
gen: $(STAMP) $(WEB_STAMP)
	rm -rf gen/jobwire/v1 && mkdir -p gen/jobwire/v1
	$(BIN)/python -m grpc_tools.protoc -I proto -I third_party/googleapis \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -I proto -I third_party/googleapis --include_imports \
	  --descriptor_set_out=gen/jobwire/v1/jobwire.binpb $(PROTOS)
	printf '"""Generated from proto/jobwire/v1 by `make gen`; never edit by hand."""\n' > gen/jobwire/v1/__init__.py
	touch gen/jobwire/v1/py.typed
	$(BIN)/python scripts/openapi.py gen/jobwire/v1/openapi.json $(PROTOS)
	rm -rf $(WEB_GEN) && mkdir -p $(WEB_GEN)
	$(BIN)/python -m grpc_tools.protoc -I proto -I third_party/googleapis \
	  --plugin=protoc-gen-es=web/node_modules/.bin/protoc-gen-es \
	  --es_out=$(WEB_GEN) --es_opt=target=ts,import_extension=none $(PROTOS) $(GOOGLE_API_PROTOS)

# Fails when gen/ or web/src/gen is not what `make gen` makes from proto/.
check-gen: gen
	@git diff --exit-code --stat -- gen $(WEB_GEN) || (echo "generated code is stale: run 'make gen' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- gen $(WEB_GEN))" || (git status --porcelain -- gen $(WEB_GEN); echo "generated code has untracked files: run 'make gen' and commit" && exit 1)

# The browser client built into web/dist (rebuilt only when a source changed).
web: web/dist/index.html
web/dist/index.html: $(WEB_STAMP) $(WEB_SOURCES)
	cd web && npx tsc --noEmit && npx vite build --logLevel warn
	touch web/dist/index.html

web-typecheck: $(WEB_STAMP)
	cd web && npx tsc --noEmit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# mypy --strict over the jobwire namespace, laid out as it is imported.
typecheck: $(STAMP) web-typecheck
	rm -rf .typecheck && mkdir -p .typecheck/jobwire
	for d in core server worker cli envoy agents; do ln -s ../../$$d .typecheck/jobwire/$$d; done
	ln -s ../../gen/jobwire/v1 .typecheck/jobwire/v1
	for f in sdk/*; do ln -s ../../$$f .typecheck/jobwire/; done
	cd .typecheck && MYPYPATH=. ../$(BIN)/mypy --config-file ../pyproject.toml -p jobwire --exclude 'jobwire/v1/'

# Start a Docker engine if none runs (installing Debian's docker.io as root).
docker:
	bash scripts/ensure-docker.sh

# Local images for the demo and the tests (no registry is reachable).
images: docker
	bash scripts/build-images.sh

# Debian tools the tests drive: Chromium (gRPC-Web from a browser, and the web client's tests
# through playwright-core) and grpc-gateway's protoc-gen-swagger (the proto's HTTP rules checked
# by grpc-gateway itself).
browser:
	bash scripts/ensure-debian-packages.sh chromium=chromium protoc-gen-swagger=golang-grpc-gateway

# Debian's PostgreSQL, for the scale-out tests (each test session runs a throwaway cluster of its
# own in a temporary folder; the system cluster is not used).
postgres:
	bash scripts/ensure-debian-packages.sh pg_ctlcluster=postgresql

# deploy/envoy.yaml: envoy/envoy.yaml rendered for the three replicas of deploy/docker-compose.yml.
deploy-envoy: $(STAMP)
	$(BIN)/python -c 'import sys; from pathlib import Path; from jobwire.envoy import config; \
	  config.write(config.deployment(), Path("deploy/envoy.yaml")); \
	  config.write(config.deployment_secret(), Path("deploy/envoy-tls.yaml"))'

test: install docker images browser postgres check-gen lint typecheck web
	$(BIN)/pytest

# Benchmarks (never part of `make test`): every figure against a baseline measured in the same run.
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS="--quick --only 2,4 --size log_lines=100000"`.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) docker images
	bash scripts/ensure-debian-packages.sh redis-server=redis-server
	$(BIN)/python -m bench $(BENCH_ARGS)

# Where the server's CPU goes on the submit and claim paths (py-spy over figure 2's two modes); writes
# bench/results/profile/<label>.md and the folded stacks. PROFILE_ARGS passes options, e.g.
# `make profile PROFILE_ARGS="--label after-main --jobs 4000"`. Recording the client (py-spy's parent)
# needs root or kernel.yama.ptrace_scope=0; without, only the server and the workers are recorded.
profile: $(BENCH_STAMP)
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

# Fault injection (never part of `make test`; as root for the tmpfs scenarios): kill -9, cut and stalled
# streams, cancels under load, PostgreSQL outages, full disks; the table goes to bench/results/chaos.md.
# CHAOS_ARGS passes options, e.g. `make chaos CHAOS_ARGS="--quick --only cancels,server-kill"`.
chaos: $(STAMP) docker images postgres
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

# Server + Envoy + a worker on queue `local`, all in one process tree.
run: install docker images web
	$(BIN)/jobwire up

clean:
	rm -rf .typecheck .pytest_cache .mypy_cache .ruff_cache build *.egg-info web/dist web/test-results
