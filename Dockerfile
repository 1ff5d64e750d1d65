# The early-exit gateway: slim, no torch. The model repository is mounted at /models.
#   docker build -t early-exit-gateway .
#   docker run -p 8080:8080 -p 8081:8081 -v "$PWD/model_repository:/models:ro" early-exit-gateway
# Beside a Triton server: see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 10001 gateway

COPY pyproject.toml README.md ./
COPY common ./common
COPY serving ./serving
# Only the serving extra: onnxruntime, fastapi, grpcio, tritonclient... and no torch.
# Every version is pinned in pyproject.toml, which this install reads.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"

ENV EE_HOST=0.0.0.0 \
    EE_MODEL_REPOSITORY=/models \
    EE_HTTP_PORT=8080 \
    EE_GRPC_PORT=8081
EXPOSE 8080 8081
USER 10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving"]
