# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKPOINT ?= checkpoints/mwresnet56_5.safetensors
# The served cascade: a small network's exits (ResNet-20, temperature-scaled) in front of the
# reference's exits 45 and 56 (export.compose; README.md, "The reference checkpoint", says where each comes from).
FRONT_CHECKPOINT ?= checkpoints/mwresnet20_3.safetensors
REFERENCE_EXITS ?= 45,56
MODEL_NAME ?= r20_r56

.PHONY: setup triton front-proxy serve test lint evaluate bench robustness clean seed-curves

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

# nginx, for the front proxy that refuses overload before the gateway's Python (deploy/nginx; its tests and
# `benchmarks.robustness --front-proxy-limit`): Debian's package where apt-get can install it, else its tests skip.
front-proxy:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1) || \
		echo "nginx is not installed and apt-get could not install it: the front proxy's tests skip"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so that nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,bench,dev]'
	touch $(STAMP)

REPOSITORY ?= model_repository
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081

# The main job: the gateway on embedded ONNX Runtime with the reference cascade.
# The repository is generated from the committed checkpoints when missing: export
# (validated against PyTorch), latency profile, thresholds calibrated on held-out data.
serve: $(STAMP) $(REPOSITORY)/manifest.json
	$(BIN)/python -m serving --model-repository $(REPOSITORY) --backend onnxruntime \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

$(REPOSITORY)/manifest.json: $(FRONT_CHECKPOINT) $(CHECKPOINT)
	$(BIN)/python -m export.compose --stage $(FRONT_CHECKPOINT) --stage $(CHECKPOINT):$(REFERENCE_EXITS) \
		--name $(MODEL_NAME) --model-repository $(REPOSITORY) --backend python --force
	$(BIN)/python -m export.profile --model-repository $(REPOSITORY) --repeats 10
	$(BIN)/python -m benchmarks.calibrate --model-repository $(REPOSITORY) --max-drop 0.5

# The latency-accuracy benchmark (short, a few minutes); BENCH_ARGS=--full for the long one.
bench: $(STAMP) $(TRITON_STAMP) $(REPOSITORY)/manifest.json
	$(BIN)/python -m benchmarks.run --model-repository $(REPOSITORY) $(BENCH_ARGS)

# The robustness run (issue 25: overload, cancellation, shutdown, Triton killed, budget, soak, image bomb, fuzz;
# about 18 minutes, most of it the 10-minute soak and the 50,000-request fuzz): benchmarks/results/<date>-<machine>-robustness/robustness.json.
# ROBUSTNESS_ARGS="--phases overload,budget --overload-s 30" picks phases and durations; --quick: seconds each.
robustness: $(STAMP) $(TRITON_STAMP) $(REPOSITORY)/manifest.json
	$(BIN)/python -m benchmarks.robustness --model-repository $(REPOSITORY) $(ROBUSTNESS_ARGS)

evaluate: $(STAMP)
	$(BIN)/python -m training.evaluate --checkpoint $(CHECKPOINT)

# The seed networks' accuracy-vs-MACs curves beside the reference's (issues 22, 23): curves.json,
# accuracy_vs_macs.png and README.md in SEED_CURVES_OUT; SEED_CHECKPOINTS picks the checkpoints.
SEED_CHECKPOINTS ?= $(wildcard checkpoints/seeds/*.safetensors)
SEED_CURVES_OUT ?= benchmarks/results/seed-curves
seed-curves: $(STAMP)
	$(BIN)/python -m benchmarks.seed_curves --output $(SEED_CURVES_OUT) $(SEED_CHECKPOINTS)

# pytest exits 5 when it collects nothing: that is not a failure.
test: $(STAMP) $(TRITON_STAMP) front-proxy
	EE_REQUIRE_TRITON=1 $(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .ruff_cache
