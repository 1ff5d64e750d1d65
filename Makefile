# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT ?= checkpoints/mwresnet56_5.safetensors

.PHONY: setup triton serve test lint evaluate clean

TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

setup: $(STAMP)

# A real CPU tritonserver (Python backend) for integration tests and benchmarks;
# its own venv because the wheel pins numpy<2. See ../shared/TRITON.md.
triton: $(TRITON_STAMP)

$(TRITON_STAMP):
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet nvidia-pytriton==0.7.0 'numpy<2' onnxruntime==1.32.0
	touch $(TRITON_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so that nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
	touch $(STAMP)

# The main job. Until the gateway lands it evaluates the reference checkpoint.
serve: $(STAMP)
	$(BIN)/python -m training.evaluate --checkpoint $(CHECKPOINT)

evaluate: serve

# pytest exits 5 when it collects nothing: that is not a failure.
test: $(STAMP) $(TRITON_STAMP)
	EE_REQUIRE_TRITON=1 $(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .ruff_cache
