"""The `<model>_cascade` Triton model (the whole cascade inside a real tritonserver, in
both modes) against the gateway on the embedded backend, called by stock tritonclient;
and the gateway's `--backend triton-cascade` that forwards to it."""

import asyncio
import os
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from benchmarks.triton_launcher import TritonServer
from common.manifest import read_manifest, write_manifest
from common.onnxruntime_session import create_session
from common.triton_cascade import BLS, IN_PROCESS, MODES, cascade_model_name
from export.repository import CASCADE_MODEL_FILES
from serving.normalisation import normalise_uint8
from serving.policy import confidence_scores, softmax

from .conftest import GatewayProcess

MODEL = "mwresnet8_3"
CASCADE = cascade_model_name(MODEL)
IMAGES = np.random.default_rng(7).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
# Calibrated thresholds (the manifest's), the default options, and every policy and score.
PARAMETER_SETS = [{}, {"policy": "full"}, {"policy": "fixed", "exit_depth": 5}, {"threshold": "0.0"},
                  {"score": "margin"}, {"score": "entropy", "threshold": "0.05"}, {"policy": "confidence"}]


def _exit_scores(repository, manifest) -> np.ndarray:
    """(exits, images) max-softmax score of every exit's per-exit model on IMAGES."""
    images = normalise_uint8(IMAGES, manifest.mean, manifest.std)
    scores = []
    for entry in manifest.exits:
        session = create_session(repository / entry.exit_model.name / str(entry.exit_model.version) / "model.onnx")
        scores.append(confidence_scores(softmax(session.run(None, {"images": images})[0]), "max_prob"))
    return np.array(scores)


def _linked_copy(source, target):
    shutil.copytree(source, target, copy_function=os.link)
    return target


@pytest.fixture(scope="module")
def calibrated_repository(tiny_repository, tmp_path_factory):
    """The tiny repository with thresholds in its manifest that send IMAGES to different exits
    (each halfway between two samples' scores, so no sample sits on a threshold)."""
    repository = _linked_copy(tiny_repository, tmp_path_factory.mktemp("calibrated") / "repo")
    manifest = read_manifest(repository)
    scores = _exit_scores(repository, manifest)
    thresholds = [float(np.sort(row)[len(row) // 3 - 1: len(row) // 3 + 1].mean()) for row in scores]
    exits = [entry.__class__(**{**entry.__dict__, "threshold": threshold})
             for entry, threshold in zip(manifest.exits, thresholds)]
    write_manifest(repository, manifest.with_exits(exits))  # a new file: the original stays as it was
    return repository


def _with_mode(repository, mode, target):
    """A copy of `repository` whose cascade model runs in `mode` (its configs/<mode>.pbtxt)."""
    copy = _linked_copy(repository, target)
    config = copy / CASCADE / "config.pbtxt"
    text = (copy / CASCADE / "configs" / f"{mode}.pbtxt").read_text()
    config.unlink()  # hard-linked: replace, never write through
    config.write_text(text)
    return copy


@pytest.fixture(scope="module", params=MODES)
def triton(request, calibrated_repository, triton_venv, tmp_path_factory):
    mode = request.param
    directory = tmp_path_factory.mktemp(f"triton-{mode}")
    repository = _with_mode(calibrated_repository, mode, directory / "repo")
    with TritonServer(repository, triton_venv, log_path=directory / "tritonserver.log") as server:
        server.mode = mode
        yield server


@pytest.fixture(scope="module")
def gateway(calibrated_repository, tmp_path_factory):
    """The gateway on the embedded ONNX Runtime backend: the answers to match."""
    process = GatewayProcess(calibrated_repository, log_path=tmp_path_factory.mktemp("gw") / "gateway.log")
    yield process
    assert process.stop() == 0


def _ask(module, url, model, images, parameters, name="images", datatype="UINT8"):
    """Stock tritonclient code, as written for the gateway: (logits, exit_depth, confidence)."""
    client = module.InferenceServerClient(url)
    tensor = module.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    result = client.infer(model, [tensor], parameters=parameters)
    return tuple(result.as_numpy(output) for output in ("logits", "exit_depth", "confidence"))


async def _ask_at_once(url, jobs):
    """Every (images, parameters) job sent at once on one stock tritonclient aio channel."""
    client = grpcaio.InferenceServerClient(url)
    try:
        async def ask(images, parameters):
            tensor = grpcaio.InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            result = await client.infer(MODEL, [tensor], parameters=parameters)
            return tuple(result.as_numpy(output) for output in ("logits", "exit_depth", "confidence"))

        return await asyncio.gather(*(ask(*job) for job in jobs))
    finally:
        await client.close()


def _assert_same(answer, expected):
    logits, depths, confidence = answer
    assert depths.shape == expected[1].shape == (len(IMAGES),)
    assert depths.tolist() == expected[1].tolist()
    np.testing.assert_allclose(logits, expected[0], atol=1e-4)
    np.testing.assert_allclose(confidence, expected[2], atol=1e-5)


# -- the exporter ---------------------------------------------------------------
def test_the_exporter_writes_the_cascade_model_with_a_config_per_mode(tiny_repository):
    model_dir = tiny_repository / CASCADE
    for file_name, source in CASCADE_MODEL_FILES.items():  # copied verbatim: one implementation
        assert (model_dir / "1" / file_name).read_bytes() == source.read_bytes(), file_name
    modes = {}
    for name in ["config.pbtxt", *(f"configs/{mode}.pbtxt" for mode in MODES)]:
        config = text_format.Parse((model_dir / name).read_text(), model_config_pb2.ModelConfig())
        assert config.name == CASCADE and config.backend == "python" and config.dynamic_batching
        assert [i.name for i in config.input] == ["images", "normalised_images"]
        assert [o.name for o in config.output] == ["logits", "probabilities", "exit_depth", "confidence"]
        modes[name] = config.parameters["mode"].string_value
    assert modes == {"config.pbtxt": IN_PROCESS, f"configs/{IN_PROCESS}.pbtxt": IN_PROCESS,
                     f"configs/{BLS}.pbtxt": BLS}
    labels = (model_dir / "labels.txt").read_text().split()
    assert labels == read_manifest(tiny_repository).classes


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_full_image_repositories_get_the_bls_cascade(tiny_checkpoint, tmp_path, backend):
    """A full Triton image runs the segments on its onnxruntime or tensorrt backend: the cascade
    calls them with BLS (keeping activations on the GPU where it can); TensorRT has no ONNX
    files for the in_process mode, so its repository carries the bls config only."""
    from export.pipeline import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(tiny_checkpoint, "3", tmp_path / "repo", backend=backend, validation_images=20),
                      plan_builder=lambda onnx_bytes, spec, name: b"plan", log=lambda message: None)
    model_dir = tmp_path / "repo" / CASCADE
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.parameters["mode"].string_value == BLS
    assert config.parameters["bls_memory"].string_value == "auto"
    expected = [BLS] if backend == "tensorrt" else sorted([BLS, IN_PROCESS])
    assert sorted(path.stem for path in (model_dir / "configs").iterdir()) == expected
    assert (model_dir / "1" / "model.py").read_bytes() == CASCADE_MODEL_FILES["model.py"].read_bytes()


# -- the cascade model against the gateway --------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cascade_model_answers_as_the_gateway_per_sample(triton, gateway, protocol):
    module = grpcclient if protocol == "grpc" else httpclient
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    gateway_url = gateway.grpc_url if protocol == "grpc" else gateway.http_url
    depths_seen = set()
    for parameters in PARAMETER_SETS:
        expected = _ask(module, gateway_url, MODEL, IMAGES, parameters)
        _assert_same(_ask(module, url, CASCADE, IMAGES, parameters), expected)
        if not parameters:
            depths_seen = set(expected[1].tolist())
    assert len(depths_seen) > 1, "the calibrated thresholds should send the images to several exits"


def test_each_mode_runs_the_stages_where_it_says(triton):
    """bls: every stage is a request to the segment model; in_process: the segment models see none."""
    client = httpclient.InferenceServerClient(triton.http_url)
    _ask(httpclient, triton.http_url, CASCADE, IMAGES, {"policy": "full"})
    for entry in read_manifest(triton.repository).exits:
        stats = client.get_inference_statistics(entry.segment_model.name)["model_stats"][0]
        assert (int(stats["inference_count"]) > 0) == (triton.mode == BLS), entry.segment_model.name


def test_concurrent_requests_with_different_options_are_answered_each_by_its_own(triton, gateway):
    """Requests that Triton batches together keep their own policies (samples re-batched per stage)."""
    jobs = [(IMAGES[i:i + 4], PARAMETER_SETS[i % len(PARAMETER_SETS)]) for i in range(0, len(IMAGES), 2)] * 3
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: _ask(grpcclient, triton.grpc_url, CASCADE, *job), jobs))
    for (images, parameters), answer in zip(jobs, answers):
        expected = _ask(grpcclient, gateway.grpc_url, MODEL, images, parameters)
        assert answer[1].tolist() == expected[1].tolist()
        np.testing.assert_allclose(answer[0], expected[0], atol=1e-4)


def test_normalised_input_gives_the_same_answers(triton):
    manifest_images = normalise_uint8(IMAGES, *_mean_std(triton))
    raw = _ask(grpcclient, triton.grpc_url, CASCADE, IMAGES, {})
    _assert_same(_ask(grpcclient, triton.grpc_url, CASCADE, manifest_images, {}, "normalised_images", "FP32"), raw)


def _mean_std(server):
    manifest = read_manifest(server.repository)
    return manifest.mean, manifest.std


def test_budget_policy(triton):
    first = read_manifest(triton.repository).exit_depths[0]
    _, depths, _ = _ask(httpclient, triton.http_url, CASCADE, IMAGES, {"policy": "budget", "budget_ms": "1e-6"})
    assert set(depths.tolist()) == {first}  # no next stage fits: every sample leaves at the first exit
    generous = _ask(httpclient, triton.http_url, CASCADE, IMAGES, {"policy": "budget", "budget_ms": "1e6"})
    _assert_same(generous, _ask(httpclient, triton.http_url, CASCADE, IMAGES, {}))  # as confidence alone


def test_classification_extension_names_the_classes(triton):
    client = httpclient.InferenceServerClient(triton.http_url)
    tensor = httpclient.InferInput("images", list(IMAGES[:2].shape), "UINT8")
    tensor.set_data_from_numpy(IMAGES[:2])
    result = client.infer(CASCADE, [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=2)])
    top = result.as_numpy("logits")
    classes = read_manifest(triton.repository).classes
    assert top.shape == (2, 2) and all(entry.decode().split(":")[2] in classes for entry in top.ravel())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("parameters", "message"), [
    ({"policy": "fastest"}, "unknown policy 'fastest'"),
    ({"score": "vibes"}, "unknown score"),
    ({"threshold": "0.5,0.6"}, "2 thresholds for 3 exits"),
    ({"threshold": "high"}, "must be a number"),
    ({"policy": "fixed"}, "needs exit_depth"),
    ({"policy": "fixed", "exit_depth": 4}, "available depths"),
    ({"policy": "budget"}, "needs budget_ms"),
    ({"policy": "budget", "budget_ms": "-3"}, "positive"),
])
def test_bad_parameters_are_error_responses_not_crashes(triton, protocol, parameters, message):
    module = grpcclient if protocol == "grpc" else httpclient
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with pytest.raises(InferenceServerException, match=message) as raised:
        _ask(module, url, CASCADE, IMAGES[:2], parameters)
    assert "INVALID_ARG" in str(raised.value.status()) or raised.value.status() == "400"
    assert _ask(module, url, CASCADE, IMAGES[:2], {})[1].shape == (2,)  # the model still serves


def test_the_forwarding_client_answers_and_fails_as_tritonclient(triton):
    """serving.kserve_grpc_client (the triton-cascade gateway's gRPC client) against tritonclient on
    the same requests to <model>_cascade: the same outputs; Triton's refusal the same exception."""
    import asyncio

    from serving.kserve_grpc_client import KServeGrpcClient, constant_part
    from serving.triton_cascade import OUTPUTS, _gateway_error

    images = normalise_uint8(IMAGES, *_mean_std(triton))

    async def ask(parameters):
        client = KServeGrpcClient(triton.grpc_url)
        try:
            return await client.infer(constant_part(CASCADE, OUTPUTS, parameters), "normalised_images", "FP32",
                                      images, 10.0)
        finally:
            await client.close()

    for parameters in [{}, {"policy": "fixed", "exit_depth": 5}, {"score": "entropy", "threshold": "0.05"},
                       {"threshold": 0.6}]:  # a float goes as double_param, as tritonclient sends it
        answer = asyncio.run(ask(parameters))
        expected = _ask(grpcclient, triton.grpc_url, CASCADE, images, parameters, "normalised_images", "FP32")
        for name, values in zip(OUTPUTS, expected):
            assert answer[name].dtype == values.dtype and answer[name].shape == values.shape
            assert np.array_equal(answer[name], values)
    from tritonclient.grpc import service_pb2

    sent = service_pb2.ModelInferRequest.FromString(
        constant_part(CASCADE, OUTPUTS, {"threshold": 0.6, "exit_depth": 5}))
    assert sent.parameters["threshold"].double_param == 0.6 and sent.parameters["exit_depth"].int64_param == 5
    with pytest.raises(InferenceServerException, match="unknown policy") as raised:
        asyncio.run(ask({"policy": "fastest"}))
    assert "INVALID_ARG" in str(raised.value.status())
    assert type(_gateway_error(CASCADE, raised.value)).__name__ == "InvalidParameter"


def test_a_bad_request_batched_with_good_ones_fails_alone(triton):
    jobs = [{"policy": "fastest"} if i % 3 == 0 else {} for i in range(12)]

    def call(parameters):
        try:
            return _ask(grpcclient, triton.grpc_url, CASCADE, IMAGES[:3], parameters)[1].tolist()
        except InferenceServerException as error:
            return str(error)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, jobs))
    for parameters, result in zip(jobs, results):
        assert ("unknown policy" in result) if parameters else isinstance(result, list)


def test_images_and_normalised_images_together_are_refused(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    raw = grpcclient.InferInput("images", list(IMAGES[:1].shape), "UINT8")
    raw.set_data_from_numpy(IMAGES[:1])
    normalised = grpcclient.InferInput("normalised_images", [1, 3, 32, 32], "FP32")
    normalised.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="exactly one of the inputs"):
        client.infer(CASCADE, [raw, normalised])


# -- the gateway in front of the cascade model ------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_gateway_with_the_triton_cascade_backend_answers_as_the_embedded_one(
        triton, gateway, calibrated_repository, tmp_path, protocol):
    if triton.mode != IN_PROCESS:
        pytest.skip("one mode is enough for the gateway's forwarding")
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    forwarding = GatewayProcess(calibrated_repository, "--backend", "triton-cascade", "--triton-url", url,
                                "--triton-protocol", protocol, log_path=tmp_path / "gateway-cascade.log")
    try:
        for parameters in [*PARAMETER_SETS, {"policy": "budget", "budget_ms": "1e6"}]:
            expected = _ask(grpcclient, gateway.grpc_url, MODEL, IMAGES, parameters)
            _assert_same(_ask(grpcclient, forwarding.grpc_url, MODEL, IMAGES, parameters), expected)
        big = np.concatenate([IMAGES] * 5)  # more images than the cascade model's max_batch_size
        assert _ask(httpclient, forwarding.http_url, MODEL, big, {})[1].tolist() == \
            _ask(httpclient, gateway.http_url, MODEL, big, {})[1].tolist()
        with pytest.raises(InferenceServerException, match="unknown policy"):
            _ask(httpclient, forwarding.http_url, MODEL, IMAGES[:1], {"policy": "fastest"})
        # Concurrent requests: those with the same options go to Triton together (fewer Triton requests
        # than gateway requests), each answered with its own rows, as the embedded gateway answers it.
        statistics = httpclient.InferenceServerClient(triton.http_url)

        def triton_requests() -> int:
            stats = statistics.get_inference_statistics(CASCADE)["model_stats"][0]["inference_stats"]
            return int(stats["success"]["count"])

        jobs = [(IMAGES[i % 13:i % 13 + 1 + i % 3], PARAMETER_SETS[i % 3]) for i in range(96)]
        before = triton_requests()
        # All at once from one channel (a channel per request spreads the arrivals over its connection
        # set-ups, and on a busy machine each then found no call in flight to wait behind).
        answers = asyncio.run(_ask_at_once(forwarding.grpc_url, jobs))
        assert triton_requests() - before < len(jobs)
        for (images, parameters), answer in zip(jobs, answers):
            expected = _ask(grpcclient, gateway.grpc_url, MODEL, images, parameters)
            assert answer[1].tolist() == expected[1].tolist()
            np.testing.assert_allclose(answer[0], expected[0], atol=1e-4)
            np.testing.assert_allclose(answer[2], expected[2], atol=1e-5)
        with urllib.request.urlopen(f"http://{forwarding.http_url}/metrics") as response:  # its own metrics
            assert "gateway_exits_total" in response.read().decode()
    finally:
        assert forwarding.stop() == 0


def test_the_forwarding_gateway_answers_running_and_waiting_requests_at_shutdown(triton, calibrated_repository,
                                                                                 tmp_path):
    """Triton frozen (SIGSTOP): the forwarding gateway's calls hang, the requests behind them wait to go
    together; SIGTERM with no grace answers every one of them UNAVAILABLE and exits with status 3."""
    import re
    import signal
    import time

    if triton.mode != IN_PROCESS:
        pytest.skip("one mode is enough for the gateway's forwarding")
    log = tmp_path / "forwarding.log"
    forwarding = GatewayProcess(calibrated_repository, "--backend", "triton-cascade", "--triton-url", triton.grpc_url,
                                "--shutdown-grace-s", "0", log_path=log)
    group = os.getpgid(triton.process.pid)  # tritonserver and its stubs

    def admitted() -> float:
        match = re.search(r"^gateway_admitted_images (\S+)$", forwarding.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    def call(position):
        try:
            _ask(grpcclient, forwarding.grpc_url, MODEL, IMAGES[position:position + 2], PARAMETER_SETS[position % 2])
            return "ok"
        except InferenceServerException as error:
            return str(error.status())

    try:
        os.killpg(group, signal.SIGSTOP)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, position) for position in range(6)]
            deadline = time.monotonic() + 60
            while admitted() < 12:
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.02)
            forwarding.process.send_signal(signal.SIGTERM)
            outcomes = [future.result(timeout=60) for future in futures]
        status = forwarding.process.wait(timeout=60)
    finally:
        os.killpg(group, signal.SIGCONT)
        forwarding.stop()
    assert outcomes == ["StatusCode.UNAVAILABLE"] * 6, outcomes
    assert status == 3
    assert "answered UNAVAILABLE" in log.read_text()
    assert _ask(grpcclient, triton.grpc_url, CASCADE, IMAGES, {})[1].shape == (len(IMAGES),)  # Triton serves on


def test_triton_cascade_backend_without_triton_is_a_one_line_error(tiny_repository):
    from benchmarks.triton_launcher import free_port

    from .conftest import run_module

    result = run_module("serving", "--model-repository", str(tiny_repository), "--backend", "triton-cascade",
                        "--triton-url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "not reachable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def two_model_repository(tiny_repository, imagefolder, tmp_path_factory):
    """The tiny repository with a second model (other weights) exported into it as `tiny_b`: its manifest is
    manifest.tiny_b.json and its cascade model tiny_b_cascade."""
    from .multi_model_helpers import SECOND, export, make_checkpoint

    directory = tmp_path_factory.mktemp("two-models")
    checkpoint = make_checkpoint(imagefolder, directory / "other.safetensors", seed=7)
    repository = directory / "repo"
    shutil.copytree(tiny_repository, repository)
    export(checkpoint, repository, SECOND)
    assert (repository / f"manifest.{SECOND}.json").exists()
    assert (repository / cascade_model_name(SECOND) / "1" / "model.py").exists()
    return repository


@pytest.mark.parametrize("mode", MODES)
def test_each_cascade_model_reads_its_own_models_manifest(two_model_repository, triton_venv, tmp_path, mode):
    """Two models in one repository on a real tritonserver: each `<model>_cascade` runs its own model (its
    manifest: manifest.json for the first, manifest.<model>.json for the second), in both modes."""
    from .multi_model_helpers import SECOND

    repository = _linked_copy(two_model_repository, tmp_path / "repo")
    for name in (MODEL, SECOND):
        config = repository / cascade_model_name(name) / "config.pbtxt"
        text = (config.parent / "configs" / f"{mode}.pbtxt").read_text()
        config.unlink()
        config.write_text(text)
    expected = {}
    for name in (MODEL, SECOND):
        manifest = read_manifest(repository, name)
        final = manifest.exits[-1].exit_model
        session = create_session(repository / final.name / str(final.version) / "model.onnx")
        expected[name] = session.run(None, {"images": normalise_uint8(IMAGES, manifest.mean, manifest.std)})[0]
    assert not np.allclose(expected[MODEL], expected[SECOND], atol=1e-3)
    with TritonServer(repository, triton_venv, log_path=tmp_path / "tritonserver.log") as server:
        for name in (MODEL, SECOND):
            for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
                logits, depths, _ = _ask(module, url, cascade_model_name(name), IMAGES, {"policy": "full"})
                np.testing.assert_allclose(logits, expected[name], atol=1e-4)
                assert set(depths.tolist()) == {read_manifest(repository, name).exits[-1].depth}
        if mode == MODES[0]:  # the gateway forwards each model to its own cascade model
            with GatewayProcess(repository, "--backend", "triton-cascade", "--triton-url", server.grpc_url,
                                log_path=tmp_path / "gateway.log") as gateway:
                for name in (MODEL, SECOND):
                    logits, depths, _ = _ask(grpcclient, gateway.grpc_url, name, IMAGES, {"policy": "full"})
                    np.testing.assert_allclose(logits, expected[name], atol=1e-4)
                    assert set(depths.tolist()) == {read_manifest(repository, name).exits[-1].depth}
