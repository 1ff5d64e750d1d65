"""Several models in one repository (issue 26): real tiny multi-exit nets exported to real ONNX, real
gateway processes, real tritonclient clients; new versions and repository changes: test_model_versions.py."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common.manifest import MANIFEST_FILE, list_manifests, read_manifest

from .conftest import GatewayProcess, png_bytes

# the fixtures two_models and other_checkpoint are in conftest.py
from .multi_model_helpers import (
    MODEL,
    SECOND,
    by_model,
    final_logits,
    fresh_copy,
    images_for,
    infer,
    metric_series,
)


def test_export_lays_out_one_manifest_per_model(two_models, tiny_repository):
    assert (two_models / MANIFEST_FILE).read_text() == (tiny_repository / MANIFEST_FILE).read_text()
    found = list_manifests(two_models)
    assert list(found) == [MODEL, SECOND]
    assert found[SECOND].name == f"manifest.{SECOND}.json"
    second = read_manifest(two_models, SECOND)
    assert second.model == SECOND and all(e.segment_model.name.startswith(f"{SECOND}_") for e in second.exits)
    assert read_manifest(two_models).model == MODEL  # the first model's manifest, as before


def test_two_models_served_at_once(two_models, tmp_path):
    images = images_for(two_models)
    expected = {name: final_logits(two_models, name, images) for name in (MODEL, SECOND)}
    assert not np.allclose(expected[MODEL], expected[SECOND], atol=1e-3)  # really two different models
    with GatewayProcess(two_models, log_path=tmp_path / "gateway.log") as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
        for name in (MODEL, SECOND):
            for module, client in ((httpclient, http), (grpcclient, grpc)):
                result = infer(module, client, name, images)
                np.testing.assert_allclose(result.as_numpy("logits"), expected[name], atol=1e-4)
                assert client.is_model_ready(name) and client.is_model_ready(name, "1")
            assert http.get_model_metadata(name)["name"] == name
            assert grpc.get_model_metadata(name).name == name and grpc.get_model_metadata(name).versions == ["1"]
        assert not http.is_model_ready("nope") and not grpc.is_model_ready("nope")
        with pytest.raises(InferenceServerException, match="unknown model"):
            infer(httpclient, http, "nope", images)
        index = http.get_model_repository_index()
        assert [(m["name"], m["version"], m["state"]) for m in index] == [(MODEL, "1", "READY"), (SECOND, "1", "READY")]
        grpc_index = grpc.get_model_repository_index()
        assert [(m.name, m.version, m.state) for m in grpc_index.models] == [(MODEL, "1", "READY"),
                                                                             (SECOND, "1", "READY")]
        # /v1/classify: ?model= chooses, the default is the repository's first model.
        upload = png_bytes(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for query, name in (("", MODEL), (f"?model={SECOND}", SECOND), (f"?model={MODEL}", MODEL)):
            answer = httpx.post(f"http://{gateway.http_url}/v1/classify{query}", files={"files": ("a.png", upload)})
            assert answer.status_code == 200 and answer.json()["model"] == name
        assert httpx.post(f"http://{gateway.http_url}/v1/classify?model=nope",
                          files={"files": ("a.png", upload)}).status_code == 404
        # Unload one model: the other serves on; a load serves it again.
        http.unload_model(SECOND)
        assert not http.is_model_ready(SECOND) and http.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException, match="unknown model"):
            infer(grpcclient, grpc, SECOND, images)
        states = {m["name"]: (m["state"], m["reason"]) for m in http.get_model_repository_index()}
        assert states[SECOND] == ("UNAVAILABLE", "unloaded") and states[MODEL][0] == "READY"
        http.load_model(SECOND)
        np.testing.assert_allclose(infer(grpcclient, grpc, SECOND, images).as_numpy("logits"), expected[SECOND],
                                   atol=1e-4)
        # The same over gRPC (RepositoryModelLoad / RepositoryModelUnload, as Triton's).
        grpc.unload_model(SECOND)
        assert not grpc.is_model_ready(SECOND) and grpc.is_model_ready(MODEL)
        states = {m.name: (m.state, m.reason) for m in grpc.get_model_repository_index().models}
        assert states[SECOND] == ("UNAVAILABLE", "unloaded")
        with pytest.raises(InferenceServerException, match="unknown model"):
            infer(httpclient, http, SECOND, images)
        with pytest.raises(InferenceServerException, match="is not loaded") as error:
            grpc.unload_model(SECOND)
        assert error.value.status() == "StatusCode.NOT_FOUND"
        grpc.load_model(SECOND)
        assert grpc.is_model_ready(SECOND)
        np.testing.assert_allclose(infer(httpclient, http, SECOND, images).as_numpy("logits"), expected[SECOND],
                                   atol=1e-4)
        with pytest.raises(InferenceServerException, match="not supported") as error:
            grpc.load_model(SECOND, config='{"max_batch_size": 8}')
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="no model 'nope'") as error:
            grpc.load_model("nope")
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert gateway.stop() == 0
    log = (tmp_path / "gateway.log").read_text()
    assert "model unloaded" in log and "previous model version released" in log


def test_each_model_has_its_own_metric_series(two_models, tmp_path):
    """Per-model series carry a `model` label with each model's own counts: samples, request latency by
    protocol, exits by depth, stage batches, queue depth (one gauge series per model, gone when unloaded)."""
    images = images_for(two_models)  # 4 images a request
    depths = read_manifest(two_models).exit_depths
    with GatewayProcess(two_models, log_path=tmp_path / "gateway.log") as gateway:
        http = httpclient.InferenceServerClient(gateway.http_url)
        grpc = grpcclient.InferenceServerClient(gateway.grpc_url)
        for _ in range(3):  # MODEL: 3 gRPC requests, the full network
            infer(grpcclient, grpc, MODEL, images)
        for _ in range(2):  # SECOND: 2 HTTP requests, the first exit
            tensor = httpclient.InferInput("images", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            http.infer(SECOND, [tensor], parameters={"policy": "fixed", "exit_depth": depths[0]})
        series = metric_series(gateway.metrics())
        assert by_model(series, "gateway_samples_total") == {MODEL: 12, SECOND: 8}
        assert by_model(series, "gateway_request_latency_seconds_count", protocol="grpc") == {MODEL: 3}
        assert by_model(series, "gateway_request_latency_seconds_count", protocol="http") == {SECOND: 2}
        assert by_model(series, "gateway_exits_total", depth=str(depths[-1])) == {MODEL: 12, SECOND: 0}
        assert by_model(series, "gateway_exits_total", depth=str(depths[0])) == {MODEL: 0, SECOND: 8}
        # Every image of a request ran the stage (or per-exit model) of the exit that answered it, once.
        for model, depth, count in ((MODEL, depths[-1], 12), (SECOND, depths[0], 8)):
            ran = sum(by_model(series, "gateway_stage_batch_size_sum", depth=stage).get(model, 0.0)
                      for stage in (str(depth), f"{depth}-direct"))
            assert ran == count, (model, depth)
        assert by_model(series, "gateway_stage_batch_size_count").keys() == {MODEL, SECOND}
        assert by_model(series, "gateway_queue_depth") == {MODEL: 0, SECOND: 0}
        http.unload_model(SECOND)
        series = metric_series(gateway.metrics())
        assert by_model(series, "gateway_queue_depth") == {MODEL: 0}
        assert by_model(series, "gateway_samples_total") == {MODEL: 12, SECOND: 8}  # counters stay
        assert gateway.stop() == 0


class BrokenBackend:
    """A real backend whose every stage call fails (what a broken model's failed batches look like)."""

    name = "broken"

    def __init__(self, inner) -> None:
        self.inner = inner

    def run(self, position, inputs, **kwargs):
        raise RuntimeError("this model's backend is broken")

    def close(self) -> None:
        self.inner.close()


def test_failed_batches_and_exits_are_counted_for_their_own_model(tiny_repository):
    """Two models' cascades on one set of metrics: one answers, the other's backend fails; each model's
    exits and failed batches land in its own series."""
    from serving.backends import OnnxRuntimeBackend
    from serving.cascade import Cascade, CascadeSettings
    from serving.errors import Unavailable
    from serving.metrics import GatewayMetrics
    from serving.policy import RequestOptions, exit_plan, resolve_options

    manifest = read_manifest(tiny_repository)
    plan = exit_plan(manifest)
    metrics = GatewayMetrics()
    full = resolve_options(RequestOptions(policy="full"), plan)
    images = images_for(tiny_repository)

    async def run():
        working = Cascade(OnnxRuntimeBackend(tiny_repository, manifest), plan, CascadeSettings(), metrics, model="a")
        broken = Cascade(BrokenBackend(OnnxRuntimeBackend(tiny_repository, manifest)), plan, CascadeSettings(),
                         metrics, model="b")
        await working.start()
        await broken.start()
        await working.infer(images, full)
        with pytest.raises(Unavailable):
            await broken.infer(images, full)
        await working.stop()
        await broken.stop()

    asyncio.run(run())
    value = metrics.registry.get_sample_value
    first, last = str(plan.depths[0]), str(plan.depths[-1])
    assert value("gateway_backend_errors_total", {"stage": first, "model": "b"}) == 1
    assert value("gateway_backend_errors_total", {"stage": first, "model": "a"}) is None
    assert value("gateway_exits_total", {"depth": last, "model": "a"}) == len(images)
    assert value("gateway_exits_total", {"depth": last, "model": "b"}) == 0
    assert value("gateway_queue_depth", {"model": "a"}) == 0 == value("gateway_queue_depth", {"model": "b"})



def test_force_export_leaves_only_its_own_model(two_models, tiny_checkpoint, tmp_path):
    repository = fresh_copy(two_models, tmp_path)
    from export.pipeline import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(checkpoint=tiny_checkpoint, output=repository, validation_images=30, force=True),
                      log=lambda message: None)
    assert list(list_manifests(repository)) == [MODEL]
    assert not any(path.name.startswith(SECOND) for path in repository.iterdir())



def test_profile_and_calibrate_write_the_manifest_of_the_model_named(two_models, tmp_path, capsys):
    """export.profile and benchmarks.calibrate take --model (default: the repository's first model) and
    write that model's manifest only."""
    from benchmarks.calibrate import main as calibrate_main
    from export.profile import main as profile_main

    repository = fresh_copy(two_models, tmp_path)
    first_before = (repository / MANIFEST_FILE).read_text()
    assert profile_main(["--model-repository", str(repository), "--model", SECOND, "--batch-sizes", "1,2",
                         "--repeats", "1", "--no-progress"]) == 0
    assert f"manifest.{SECOND}.json" in capsys.readouterr().out
    assert (repository / MANIFEST_FILE).read_text() == first_before
    second = read_manifest(repository, SECOND)
    assert second.profile and all(set(e.latency_ms["segment_model"]) == {"1", "2"} for e in second.exits)
    assert calibrate_main(["--model-repository", str(repository), "--model", SECOND, "--max-drop", "5",
                           "--threads", "1"]) == 0
    assert f"manifest.{SECOND}.json" in capsys.readouterr().out
    assert (repository / MANIFEST_FILE).read_text() == first_before
    second = read_manifest(repository, SECOND)
    assert second.calibration["method"] and second.profile  # both written into the second model's manifest
    assert second.calibration["drop_measure"] == "net"
    selection = second.calibration["margin_selection"]  # --margin auto, the default: chosen out of fold
    assert selection["tried"][-1]["margin"] == second.calibration["margin_standard_errors"]
    assert selection["within"] == 0.8 and "in at least 0.8 of those 20 trials" in selection["rule"]
    assert all(0 <= trial["out_of_fold_within"] <= 1 for trial in selection["tried"])
    assert calibrate_main(["--model-repository", str(repository), "--model", SECOND, "--max-drop", "5",
                           "--within", "mean", "--threads", "1"]) == 0
    selection = read_manifest(repository, SECOND).calibration["margin_selection"]
    assert selection["within"] is None and "keep the mean drop within" in selection["rule"]
    for bad in ("0", "1.5", "most"):
        with pytest.raises(SystemExit):
            calibrate_main(["--model-repository", str(repository), "--model", SECOND, "--within", bad])
    assert calibrate_main(["--model-repository", str(repository), "--model", SECOND, "--max-drop", "5",
                           "--drop-measure", "lost", "--threads", "1"]) == 0
    assert read_manifest(repository, SECOND).calibration["drop_measure"] == "lost"
    # Without --model: the first model's manifest.json, as before.
    assert profile_main(["--model-repository", str(repository), "--batch-sizes", "1", "--repeats", "1",
                         "--no-progress"]) == 0
    assert read_manifest(repository).profile and (repository / MANIFEST_FILE).read_text() != first_before
    from common.errors import UserError

    with pytest.raises(UserError, match="manifest of 'nope'"):
        calibrate_main(["--model-repository", str(repository), "--model", "nope"])


def test_dropped_samples_are_counted_for_their_own_model():
    from serving.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.model("a").dropped("expired").inc(3)
    metrics.model("b").dropped("cancelled").inc(2)
    value = metrics.registry.get_sample_value
    assert value("gateway_dropped_samples_total", {"reason": "expired", "model": "a"}) == 3
    assert value("gateway_dropped_samples_total", {"reason": "cancelled", "model": "b"}) == 2
    assert value("gateway_dropped_samples_total", {"reason": "expired", "model": "b"}) is None
