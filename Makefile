# Every target bootstraps .venv itself, so any of them can be the first command on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STUDY  ?= studies/default.toml
# The CPU wheel is tiny next to the CUDA one; override TORCH_SPEC to pin another build.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_GPU_SPEC ?= torch

.PHONY: help venv test sweep report gpu-check gpu-table bench doctor clean

help:
	@echo "make test       run the test suite"
	@echo "make sweep      run $(STUDY) and write results/<study>/report.html"
	@echo "make report     rebuild the report of $(STUDY) from its stored trials"
	@echo "make doctor     show the device, probe and hardware fingerprint"
	@echo "make gpu-check  short CUDA grid + OOM probe; writes results/published/gpu-check-<gpu>.csv"
	@echo "make gpu-table  the published bptt x batch-size table (GPU only)"
	@echo "make bench      the benchmarks in benchmarks/"

venv: $(STAMP)

# Rebuilt when missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU visible: installing $(TORCH_GPU_SPEC) (CUDA build)"; \
		$(PY) -m pip install -q "$(TORCH_GPU_SPEC)"; \
	else \
		echo "no NVIDIA GPU visible: installing the CPU build $(TORCH_CPU_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_CPU_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

sweep: $(STAMP)
	$(VENV)/bin/harness sweep $(STUDY)

report: $(STAMP)
	$(VENV)/bin/harness report $(STUDY)

doctor: $(STAMP)
	$(VENV)/bin/harness doctor

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

gpu-table: $(STAMP)
	bash benchmarks/gpu_table.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_probe.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_report.py

clean:
	rm -rf $(VENV) .pytest_cache
