"""What the Dockerfile runs, checked outside a container (there is no Docker engine here)."""

import re
import shutil
import subprocess
import sys

import httpx
import pytest

from benchmarks.triton_launcher import free_ports

from .conftest import REPO_ROOT


def _dockerfile():
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(re.findall(r"(EE_[A-Z_]+)=(\S+)", text))
    entrypoint = re.search(r'^ENTRYPOINT \[(.*)\]', text, re.M).group(1)
    return env, [part.strip().strip('"') for part in entrypoint.split(",")]


def test_the_image_entrypoint_serves_with_the_image_environment(tiny_repository):
    env, entrypoint = _dockerfile()
    assert entrypoint == ["python", "-m", "serving"] and env["EE_MODEL_REPOSITORY"] == "/models"
    http_port, grpc_port = free_ports(2)
    # The image's settings, with the repository and loopback ports of this test.
    env.update(EE_MODEL_REPOSITORY=str(tiny_repository), EE_HOST="127.0.0.1", EE_HTTP_PORT=str(http_port),
               EE_GRPC_PORT=str(grpc_port))
    import os
    import time

    process = subprocess.Popen([sys.executable, *entrypoint[1:]], cwd=REPO_ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{http_port}/v2/models/mwresnet8_3").status_code == 200
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


@pytest.mark.skipif(shutil.which("hadolint") is None and not (REPO_ROOT / ".venv/bin/hadolint").exists(),
                    reason="hadolint not installed")
def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or str(REPO_ROOT / ".venv/bin/hadolint")
    result = subprocess.run([binary, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
