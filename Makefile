# Every target bootstraps .venv itself, so any of them can be the first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STUDY  ?= studies/default.toml
# PyTorch: one version for both builds. On Linux a plain PyPI install pulls the CUDA-bundled wheel
# (several GB), so the build comes from the PyTorch wheel index: the CPU build where no NVIDIA GPU is
# visible, else the CUDA build named by TORCH_CUDA (cu126 for drivers older than CUDA 12.8; `bptt-harness
# doctor` says whether the driver runs it). macOS wheels on PyPI are CPU builds already.
# Overrides: make venv TORCH_GPU=1 (the CUDA build on a login node without a GPU), TORCH_GPU= (CPU),
# TORCH_INDEX_URL=<a mirror of the PyTorch index>, TORCH_INDEX_URL= (plain torch==VERSION from pip's own
# configured index: on Linux that is PyPI's CUDA-bundled wheel).
# A matching wheel already on this machine (pip's find-links) is used first, without the network.
TORCH_VERSION   ?= 2.13.0
TORCH_CUDA      ?= cu128
UNAME           ?= $(shell uname -s)
TORCH_GPU       ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_BUILD     ?= $(if $(filter Linux,$(UNAME)),$(if $(TORCH_GPU),$(TORCH_CUDA),cpu))
TORCH_INDEX_URL ?= $(if $(TORCH_BUILD),https://download.pytorch.org/whl/$(TORCH_BUILD))
TORCH_REQ        = torch==$(TORCH_VERSION)$(if $(and $(TORCH_BUILD),$(TORCH_INDEX_URL)),+$(TORCH_BUILD))

.PHONY: help venv lint test sweep report gpu-check gpu-table bench doctor clean

help:
	@echo "make lint       ruff over the code, tests, benchmarks and scripts; mypy over bptt_harness/"
	@echo "make test       run the test suite"
	@echo "make sweep      profile $(STUDY) (once), run it and write results/<study>/report.html"
	@echo "make report     rebuild the report of $(STUDY) from its stored trials"
	@echo "make doctor     show the device, probe and hardware fingerprint"
	@echo "make gpu-check  short CUDA grid + OOM probe; writes results/published/gpu-check-<gpu>.csv"
	@echo "make gpu-table  the published bptt x batch-size table (GPU only)"
	@echo "make bench      the benchmarks in benchmarks/"

venv: $(STAMP)

# Rebuilt when missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_REQ): a wheel already on this machine, else from $(or $(TORCH_INDEX_URL),pip's index)"
	$(PY) -m pip install -q --no-index --no-deps "$(TORCH_REQ)" 2>/dev/null || \
		$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_REQ)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q -e ".[dashboard]" || echo "warning: optuna-dashboard could not be installed; its test is skipped"
	for tool in tensorboard mlflow wandb; do $(PY) -m pip install -q -e ".[$$tool]" || \
		echo "warning: $$tool could not be installed; --log $$tool:DIR says so and its tests are skipped"; done
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check bptt_harness tests benchmarks scripts
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q

# The memory and speed map first (seconds per cell; once per study): the sweep skips cells it saw run out of
# memory, and the report gets the map, the wall per bptt and the profile-vs-trials check.
sweep: $(STAMP)
	$(VENV)/bin/bptt-harness profile $(STUDY) --if-missing
	$(VENV)/bin/bptt-harness sweep $(STUDY)

report: $(STAMP)
	$(VENV)/bin/bptt-harness report $(STUDY)

doctor: $(STAMP)
	$(VENV)/bin/bptt-harness doctor

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

gpu-table: $(STAMP)
	bash benchmarks/gpu_table.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_probe.py
	$(PY) benchmarks/bench_sweep.py
	PYTHONPATH=tests $(PY) benchmarks/bench_report.py

clean:
	rm -rf $(VENV) .pytest_cache
