"""New versions swapped in while serving (issue 26), and what repository polling does when manifests
appear, change or disappear: real tiny multi-exit nets exported to real ONNX, real gateway processes, a real
tritonserver, real tritonclient clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common.manifest import MANIFEST_FILE, list_manifests, manifest_version, read_manifest, write_manifest

from .conftest import GatewayProcess

# the fixtures two_models and other_checkpoint are in conftest.py
from .multi_model_helpers import (
    MODEL,
    SECOND,
    by_model,
    export,
    final_logits,
    fresh_copy,
    images_for,
    infer,
    metric_series,
)


def test_a_model_exported_while_serving_is_picked_up_by_polling(tiny_repository, other_checkpoint, tmp_path):
    repository = fresh_copy(tiny_repository, tmp_path)
    with GatewayProcess(repository, "--poll-repository-s", "0.2", log_path=tmp_path / "gateway.log") as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        assert [m["name"] for m in http.get_model_repository_index()] == [MODEL]
        export(other_checkpoint, repository, SECOND)
        deadline = time.monotonic() + 60
        while not any(m["name"] == SECOND and m["state"] == "READY" for m in http.get_model_repository_index()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        images = images_for(repository)
        for name in (MODEL, SECOND):
            np.testing.assert_allclose(infer(httpclient, http, name, images).as_numpy("logits"),
                                       final_logits(repository, name, images), atol=1e-4)
        assert gateway.stop() == 0


def test_polling_unloads_a_model_whose_manifest_was_removed_and_loads_it_when_it_is_back(two_models, tmp_path):
    """--poll-repository-s: a model whose manifest file is deleted is unloaded as an explicit unload does it
    (new requests get 404 / NOT_FOUND, requests already inside finish with their answer, its queue-depth
    series goes, the cascade stops), while the other model answers on; its manifest back, the next poll loads
    it again."""
    repository = fresh_copy(two_models, tmp_path)
    images = images_for(repository)
    expected = {name: final_logits(repository, name, images) for name in (MODEL, SECOND)}
    manifest_path = list_manifests(repository)[SECOND]
    saved = manifest_path.read_bytes()
    log_path = tmp_path / "gateway.log"
    with GatewayProcess(repository, "--poll-repository-s", "0.2", log_path=log_path) as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
        clients = [LoadClient(protocol, url, images, model=SECOND)
                   for protocol, url in (("http", gateway.http_url), ("grpc", gateway.grpc_url))]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while sum(len(c.answers) for c in clients) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        manifest_path.unlink()
        while http.is_model_ready(SECOND):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for client in clients:
            client.stopping.set()
        for client in clients:
            client.join(30)
        # Every request either got its model's answer (those inside when it went) or "unknown model".
        answers = [answer for client in clients for answer in client.answers]
        assert len(answers) >= 20
        for _, version, logits in answers:
            assert version == "1"
            np.testing.assert_allclose(logits, expected[SECOND], atol=1e-4)
        failures = [failure for client in clients for failure in client.failures]
        assert all("unknown model" in failure for failure in failures), failures[:3]
        print(f"manifest removed under load: {len(answers)} answered, {len(failures)} unknown model")  # -s
        answer = httpx.post(f"http://{gateway.http_url}/v2/models/{SECOND}/infer",
                            json={"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                                              "data": images.ravel().tolist()}]})
        assert answer.status_code == 404 and "unknown model" in answer.json()["error"]
        with pytest.raises(InferenceServerException, match="unknown model") as error:
            infer(grpcclient, grpc, SECOND, images)
        assert error.value.status() == "StatusCode.NOT_FOUND"
        assert not grpc.is_model_ready(SECOND)
        for module, client in ((httpclient, http), (grpcclient, grpc)):  # the other model serves on
            np.testing.assert_allclose(infer(module, client, MODEL, images).as_numpy("logits"), expected[MODEL],
                                       atol=1e-4)
        assert [m["name"] for m in http.get_model_repository_index()] == [MODEL]
        assert by_model(metric_series(gateway.metrics()), "gateway_queue_depth") == {MODEL: 0}
        # An explicit load of the removed model: a clear refusal.
        answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{SECOND}/load")
        assert answer.status_code == 400 and f"no model {SECOND!r} in the repository" in answer.json()["error"]
        # The manifest back: the next poll loads the model again.
        manifest_path.write_bytes(saved)
        while not http.is_model_ready(SECOND):
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            for name in (MODEL, SECOND):
                np.testing.assert_allclose(infer(module, client, name, images).as_numpy("logits"), expected[name],
                                           atol=1e-4)
        assert [(m["name"], m["state"]) for m in http.get_model_repository_index()] == [(MODEL, "READY"),
                                                                                         (SECOND, "READY")]
        assert by_model(metric_series(gateway.metrics()), "gateway_queue_depth") == {MODEL: 0, SECOND: 0}
        assert gateway.stop() == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [unloaded] = [line for line in lines if line.get("message") == "model unloaded"]
    assert unloaded["model"] == SECOND and "removed from the repository" in unloaded["reason"]
    assert unloaded["manifest"] == manifest_path.name
    released = [line for line in lines if line.get("message") == "previous model version released"]
    assert [(line["model"], line["cut"]) for line in released] == [(SECOND, 0)]
    assert [line["model"] for line in lines if line.get("message") == "model version loaded"] == [SECOND]


def test_no_model_is_unloaded_while_the_repository_directory_itself_is_missing(two_models, tmp_path):
    """A repository swapped in by two renames (export's fallback without renameat2) is missing for a
    moment: the check of removed manifests unloads nothing then; a deleted manifest in a present repository
    is unloaded, the repository's manifest.json holding another model unloads the one it held."""
    from serving.app import Gateway
    from serving.settings import load_settings

    repository = fresh_copy(two_models, tmp_path)
    gateway = Gateway(load_settings(["--model-repository", str(repository)]))
    store = gateway.store

    async def run():
        await store.start()
        try:
            moved = repository.with_name("moved")
            repository.rename(moved)
            assert await store.unload_removed() == [] and set(store.models) == {MODEL, SECOND}
            moved.rename(repository)
            list_manifests(repository)[SECOND].unlink()
            assert await store.unload_removed() == [SECOND] and set(store.models) == {MODEL}
            assert SECOND not in store.unloaded  # not an explicit unload: polling may load it again
            manifest = read_manifest(repository)
            (repository / MANIFEST_FILE).write_text(json.dumps({**manifest.to_dict(), "model": SECOND}))
            assert await store.unload_removed() == [MODEL] and store.models == {}
            await asyncio.wait_for(asyncio.gather(*store._tasks), 30)  # the retired versions released
            assert not store.retiring
            # Loaded again in any order, the repository's first model is the default one again.
            for source in list_manifests(two_models).values():
                shutil.copyfile(source, repository / source.name)
            await store.load(SECOND)
            assert store.default_model == SECOND  # the only model loaded
            await store.load(MODEL)
            assert list(store.models) == [MODEL, SECOND] and store.default_model == MODEL
        finally:
            await store.stop(0)

    asyncio.run(run())


def test_an_explicit_load_of_a_model_whose_manifest_is_gone_is_refused_clearly(two_models, tmp_path):
    """Without polling, a model whose manifest was deleted serves on until it is unloaded; an explicit load
    of it says that its manifest is gone."""
    repository = fresh_copy(two_models, tmp_path)
    images = images_for(repository)
    with GatewayProcess(repository, log_path=tmp_path / "gateway.log") as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        manifest_path = list_manifests(repository)[SECOND]
        manifest_path.unlink()
        answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{SECOND}/load")
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]
        assert f"no model {SECOND!r} in the repository" in message and str(manifest_path) in message
        assert "is gone" in message and "version 1 keeps serving" in message
        np.testing.assert_allclose(infer(httpclient, http, SECOND, images).as_numpy("logits"),
                                   final_logits(two_models, SECOND, images), atol=1e-4)
        http.unload_model(SECOND)
        assert not http.is_model_ready(SECOND) and http.is_model_ready(MODEL)
        assert gateway.stop() == 0


def test_a_model_loaded_later_that_outgrows_the_default_grpc_limit_is_logged(tiny_repository, other_checkpoint,
                                                                              tmp_path):
    """gRPC's default limit on calls at once is the admission bound of the models served at start-up (grpc
    cannot change it later): a model loaded later that makes the models served admit more logs a warning
    saying so and what to set; both models serve."""
    repository = fresh_copy(tiny_repository, tmp_path)
    log_path = tmp_path / "gateway.log"
    with GatewayProcess(repository, "--max-queue-images", "6", log_path=log_path) as gateway:
        export(other_checkpoint, repository, SECOND)
        answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{SECOND}/load", timeout=60)
        assert answer.status_code == 200, answer.text
        grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
        images = images_for(repository)
        for name in (MODEL, SECOND):
            np.testing.assert_allclose(infer(grpcclient, grpc, name, images).as_numpy("logits"),
                                       final_logits(repository, name, images), atol=1e-4)
        assert gateway.stop() == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if line.get("message") == "grpc limit below the admission of the models served"]
    assert warning["level"] == "warning"
    assert warning["grpc_max_concurrent_rpcs"] == 6 and warning["admission_images"] == 12
    assert "--grpc-max-concurrent-rpcs" in warning["detail"] and SECOND in warning["detail"]



class LoadClient(threading.Thread):
    """Sends the same images again and again (policy full) until told to stop; keeps every answer."""

    def __init__(self, protocol: str, url: str, images: np.ndarray, model: str = MODEL) -> None:
        super().__init__(daemon=True)
        self.module = httpclient if protocol == "http" else grpcclient
        self.client = self.module.InferenceServerClient(url)
        self.images, self.model, self.stopping = images, model, threading.Event()
        self.answers: list[tuple[float, str, np.ndarray]] = []  # (sent at, model version, logits)
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                result = infer(self.module, self.client, self.model, self.images)
            except Exception as error:  # every failure is counted, none expected
                self.failures.append(str(error))
                continue
            version = result.get_response()["model_version"] if self.module is httpclient \
                else result.get_response().model_version
            self.answers.append((sent, version, result.as_numpy("logits")))


def test_new_version_swapped_in_under_load_without_a_failed_request(tiny_repository, other_checkpoint, tmp_path):
    repository = fresh_copy(tiny_repository, tmp_path)
    images = images_for(repository)
    old = final_logits(repository, MODEL, images)
    log_path = tmp_path / "gateway.log"
    with GatewayProcess(repository, "--poll-repository-s", "0.2", log_path=log_path) as gateway:
        clients = [LoadClient(protocol, url, images) for protocol, url in
                   (("http", gateway.http_url), ("grpc", gateway.grpc_url), ("http", gateway.http_url),
                    ("grpc", gateway.grpc_url))]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while sum(len(c.answers) for c in clients) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        manifest = export(other_checkpoint, repository)  # the same model, new weights: version 2
        assert manifest.model == MODEL and manifest_version(manifest) == 2
        while not all(c.answers and c.answers[-1][1] == "2" for c in clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        swapped = time.monotonic()
        while time.monotonic() < swapped + 1.0:
            time.sleep(0.05)
        for client in clients:
            client.stopping.set()
        for client in clients:
            client.join(30)
        assert gateway.stop() == 0
    new = final_logits(repository, MODEL, images)
    assert not np.allclose(old, new, atol=1e-3)
    answers = [answer for client in clients for answer in client.answers]
    assert [failure for c in clients for failure in c.failures] == []
    assert len(answers) >= 200, len(answers)
    by_version = {"1": old, "2": new}
    for _, version, logits in answers:
        np.testing.assert_allclose(logits, by_version[version], atol=1e-4)  # each answer from one version
    counts = {version: sum(1 for a in answers if a[1] == version) for version in by_version}
    assert counts["1"] > 0 and counts["2"] > 0, counts
    print(f"swap under load: {len(answers)} answers by version {counts}, none failed")  # shown with -s
    assert all(version == "2" for sent, version, _ in answers if sent > swapped)
    log = log_path.read_text()
    assert '"message": "model version loaded"' in log and '"previous_version": 1' in log
    assert "previous model version released" in log
    assert "grpc limit below" not in log  # a new version of the same model: its bound replaces the old one's


def corrupt_version(repository, model=MODEL):
    """Version 2 of every model of `model`, with the last segment's ONNX file garbage, and its manifest."""
    manifest = read_manifest(repository, model)

    def bumped(deployed):
        source, target = repository / deployed.name / "1", repository / deployed.name / "2"
        shutil.copytree(source, target)
        return dataclasses.replace(deployed, version=2)

    exits = [dataclasses.replace(entry, segment_model=bumped(entry.segment_model),
                                 exit_model=bumped(entry.exit_model) if entry.exit_model else None)
             for entry in manifest.exits]
    last = exits[-1].segment_model
    (repository / last.name / "2" / "model.onnx").write_bytes(b"this is no ONNX model" * 50)
    write_manifest(repository, manifest.with_exits(exits))


def test_broken_new_versions_are_refused_and_the_old_one_keeps_serving(tiny_repository, tmp_path):
    repository = fresh_copy(tiny_repository, tmp_path)
    images = images_for(repository)
    expected = final_logits(repository, MODEL, images)
    log_path = tmp_path / "gateway.log"
    with GatewayProcess(repository, "--poll-repository-s", "0.2", log_path=log_path) as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
        corrupt_version(repository)
        deadline = time.monotonic() + 60
        while "model version refused" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # the poll found it and refused it
        refused = [json.loads(line) for line in log_path.read_text().splitlines()
                   if '"model version refused' in line]
        assert refused and refused[0]["model"] == MODEL and refused[0]["version"] == 2
        assert refused[0]["serving_version"] == 1 and refused[0]["level"] == "error"
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            result = infer(module, client, MODEL, images)
            np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
        assert http.get_model_metadata(MODEL)["versions"] == ["1"] and http.is_model_ready(MODEL)
        [entry] = http.get_model_repository_index()
        assert entry["version"] == "1" and entry["state"] == "READY" and "refused" in entry["reason"]
        # An explicit load of the same broken version: refused again, with the reason.
        answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{MODEL}/load")
        assert answer.status_code == 400
        assert "version 2 not loaded" in answer.json()["error"] and "version 1 keeps serving" in answer.json()["error"]
        with pytest.raises(InferenceServerException, match="not loaded"):
            http.load_model(MODEL)
        with pytest.raises(InferenceServerException, match="version 2 not loaded") as error:
            grpc.load_model(MODEL)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        np.testing.assert_allclose(infer(grpcclient, grpc, MODEL, images).as_numpy("logits"), expected, atol=1e-4)
        # A manifest that is no JSON at all: refused too.
        (repository / MANIFEST_FILE).write_text("{ not json")
        answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{MODEL}/load")
        assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
        np.testing.assert_allclose(infer(grpcclient, grpc, MODEL, images).as_numpy("logits"), expected, atol=1e-4)
        assert httpx.post(f"http://{gateway.http_url}/v2/repository/models/nope/load").status_code == 400
        assert http.is_server_ready()
        assert gateway.stop() == 0


def test_triton_backend_swaps_a_new_version_under_load_through_model_control(tiny_repository, other_checkpoint,
                                                                              tiny_checkpoint, triton_venv, tmp_path):
    """--backend triton against a real tritonserver in explicit model-control mode, under continuous load
    from real clients: a load on the gateway asks Triton to load the new version's models beside the old
    ones (version_policy keeps the two newest), then swaps: no request fails, every answer is one version's,
    and the answers after the swap are version 2's. Then version 3 (Triton unloads version 1 as it loads it,
    while version 2 serves): again no failure, and version 3's answers after that swap."""
    import subprocess

    from benchmarks.triton_launcher import free_ports, http_ready, server_command, stop_process

    repository = fresh_copy(tiny_repository, tmp_path)
    assert "num_versions: 2" in (repository / read_manifest(repository).exits[0].segment_model.name
                                 / "config.pbtxt").read_text()
    images = images_for(repository)
    old = final_logits(repository, MODEL, images)
    ports = tuple(free_ports(3))
    command, env = server_command(triton_venv, repository, *ports)
    triton_log = open(tmp_path / "triton.log", "wb")
    triton = subprocess.Popen([*command, "--model-control-mode=explicit", "--load-model=*"], env=env,
                              stdout=triton_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not http_ready(f"127.0.0.1:{ports[0]}"):
            assert triton.poll() is None and time.monotonic() < deadline, (tmp_path / "triton.log").read_text()
            time.sleep(0.1)
        triton_url = f"127.0.0.1:{ports[1]}"
        with GatewayProcess(repository, "--backend", "triton", "--triton-url", triton_url,
                            log_path=tmp_path / "gateway.log") as gateway:
            client = grpcclient.InferenceServerClient(gateway.grpc_url)
            np.testing.assert_allclose(infer(grpcclient, client, MODEL, images).as_numpy("logits"), old, atol=1e-4)
            clients = [LoadClient(protocol, url, images) for protocol, url in
                       (("http", gateway.http_url), ("grpc", gateway.grpc_url))]
            for load in clients:
                load.start()
            while sum(len(c.answers) for c in clients) < 50 and time.monotonic() < deadline:
                time.sleep(0.05)
            export(other_checkpoint, repository)  # version 2, not loaded by Triton yet
            new = final_logits(repository, MODEL, images)
            segment = read_manifest(repository).exits[-1].segment_model
            triton_client = grpcclient.InferenceServerClient(triton_url)
            assert segment.version == 2 and not triton_client.is_model_ready(segment.name, "2")
            answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{MODEL}/load", timeout=120)
            assert answer.status_code == 200 and answer.json()["version"] == "2", answer.text
            swapped = time.monotonic()
            # Triton keeps version 1 of each model loaded beside version 2 (num_versions: 2).
            assert triton_client.is_model_ready(segment.name, "2") and triton_client.is_model_ready(segment.name, "1")
            while (sum(1 for c in clients for a in c.answers if a[0] > swapped) < 50
                   and time.monotonic() < deadline + 60):
                time.sleep(0.05)
            export(tiny_checkpoint, repository)  # version 3: the first weights again
            answer = httpx.post(f"http://{gateway.http_url}/v2/repository/models/{MODEL}/load", timeout=120)
            assert answer.status_code == 200 and answer.json()["version"] == "3", answer.text
            swapped_again = time.monotonic()
            while (sum(1 for c in clients for a in c.answers if a[0] > swapped_again) < 50
                   and time.monotonic() < deadline + 120):
                time.sleep(0.05)
            while any(m.version == "1" and m.state != "UNAVAILABLE" for m in
                      triton_client.get_model_repository_index().models if m.name == segment.name):
                assert time.monotonic() < deadline + 180  # Triton unloads version 1 (num_versions: 2)
                time.sleep(0.1)
            for load in clients:
                load.stopping.set()
            for load in clients:
                load.join(30)
            assert not np.allclose(old, new, atol=1e-3)
            assert [failure for c in clients for failure in c.failures] == []
            answers = [a for c in clients for a in c.answers]
            by_version = {"1": old, "2": new, "3": old}
            for _, version, logits in answers:
                np.testing.assert_allclose(logits, by_version[version], atol=1e-4)
            counts = {version: sum(1 for a in answers if a[1] == version) for version in by_version}
            assert counts["1"] > 0 and counts["2"] > 0 and counts["3"] > 0, counts
            assert all(version in ("2", "3") for sent, version, _ in answers if sent > swapped)
            assert all(version == "3" for sent, version, _ in answers if sent > swapped_again)
            print(f"Triton swap under load: {len(answers)} answers by version {counts}, none failed")
            result = infer(grpcclient, client, MODEL, images)
            np.testing.assert_allclose(result.as_numpy("logits"), old, atol=1e-4)
            assert result.get_response().model_version == "3"
            assert gateway.stop() == 0
    finally:
        stop_process(triton)
        triton_log.close()
