# The GPU overlay's plan builder (init container `build-plans`): export/to_trt.py with CUDA torch and
# the TensorRT release of the Triton image that serves the plans (tritonserver 24.10: TensorRT 10.5),
# since a plan runs only on the TensorRT release and GPU model that built it. From the repository root:
#   docker build -f deploy/kubernetes/overlays/gpu/export.Dockerfile -t early-exit-export:trt10.5 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY training ./training
COPY export ./export
# PyPI's torch for Linux is a CUDA build; the train extra brings ONNX, ONNX Runtime and the Triton
# config protobufs. tensorrt-cu12 pins the TensorRT release to that of the serving Triton image.
# Every version of the extra is pinned in pyproject.toml, which this install reads.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir torch==2.13.0 ".[train]" tensorrt-cu12==10.5.0
USER 1000
CMD ["python", "export/to_trt.py", "--help"]
