"""Image-input stages (issue 22): a cheap student and a standard network composed into one cascade
(export.compose), whose later network starts again from the image; the manifest, the ONNX chain,
the gateway's cascade (every policy), the gateway process, the Triton cascade model on the real
tritonserver in both modes, and calibration and the offline sweep on it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.calibrate import apply_thresholds
from benchmarks.exit_outputs import ExitOutputs, compute_exit_outputs, load_images
from common.checkpoint_meta import read_checkpoint_meta
from common.manifest import MANIFEST_FILE, Manifest, ManifestError, read_manifest, write_manifest
from common.onnxruntime_session import create_session
from common.triton_cascade import MODES, cascade_model_name
from export.compose import StageSpec, compose_cascade, parse_stage
from serving.backends import OnnxRuntimeBackend
from serving.cascade import Cascade, CascadeSettings
from serving.metrics import GatewayMetrics
from serving.normalisation import normalise_uint8
from serving.policy import ExitPlan, RequestOptions, confidence_scores, exit_plan, resolve_options, softmax

from .conftest import GatewayProcess, run_module, save_tiny_checkpoint

NAME = "student_full"
CASCADE = cascade_model_name(NAME)
STUDENT_EXITS = "3,8"  # of mwresnet8_3's 3, 5, 8: a chosen subset
DEPTHS = [3, 8, 15, 21, 28]  # the full mwresnet20_3's 7, 13, 20 after the student's 8 layers
IMAGES = np.random.default_rng(11).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(imagefolder, tmp_path_factory):
    """A cheap-convolution student and a standard network of another depth, same data and split."""
    directory = tmp_path_factory.mktemp("image_stage_checkpoints")
    student = save_tiny_checkpoint(imagefolder, directory / "student.safetensors", "mwresnet8_3", seed=1,
                                   conv="group:2")
    full = save_tiny_checkpoint(imagefolder, directory / "full.safetensors", "mwresnet20_3", seed=2)
    return student, full


@pytest.fixture(scope="module")
def composed(checkpoints, tmp_path_factory):
    repository = tmp_path_factory.mktemp("composed") / "model_repository"
    compose_cascade([StageSpec(checkpoints[0], STUDENT_EXITS), StageSpec(checkpoints[1])], NAME, repository,
                    validation_images=30, log=lambda message: None)
    return repository


@pytest.fixture(scope="module")
def per_exit(composed):
    """(exits, images, classes) logits of every per-exit ONNX model on IMAGES: what each exit answers."""
    manifest = read_manifest(composed)
    images = normalise_uint8(IMAGES, manifest.mean, manifest.std)
    logits = []
    for entry in manifest.exits:
        path = composed / entry.exit_model.name / str(entry.exit_model.version) / "model.onnx"
        logits.append(create_session(path).run(None, {"images": images})[0])
    return np.stack(logits)


def _scores(per_exit):
    return np.stack([confidence_scores(softmax(row), "max_prob") for row in per_exit])


@pytest.fixture(scope="module")
def thresholds(per_exit):
    """Per exit, halfway between two samples' scores (about a third of them confident): the images
    leave at different exits, the image stage's network included, and none sits on a threshold."""
    scores = _scores(per_exit)
    return [float(np.sort(row)[len(row) // 3 - 1: len(row) // 3 + 1].mean()) for row in scores]


@pytest.fixture(scope="module")
def calibrated(composed, thresholds, tmp_path_factory):
    """A linked copy of the composed repository with `thresholds` in its manifest."""
    repository = tmp_path_factory.mktemp("calibrated_composed") / "repo"
    shutil.copytree(composed, repository, copy_function=os.link)
    manifest = read_manifest(repository)
    exits = [entry.__class__(**{**entry.__dict__, "threshold": t}) for entry, t in zip(manifest.exits, thresholds)]
    write_manifest(repository, manifest.with_exits(exits))  # a new file: the original stays as it was
    return repository


def _confident_exit(per_exit, thresholds):
    """Per image, the first exit whose score reaches its threshold (else the last)."""
    confident = _scores(per_exit) >= np.asarray(thresholds)[:, None]
    confident[-1] = True
    return confident.argmax(axis=0)


# Request parameters (as the gateway and the Triton cascade model take them) and the exit index each
# image must leave at: None = the confident exit under the thresholds.
POLICY_CASES = [
    ({}, None),
    ({"policy": "full"}, len(DEPTHS) - 1),
    ({"policy": "fixed", "exit_depth": 15}, 2),  # the full network's first exit, from the image
    ({"policy": "fixed", "exit_depth": 8}, 1),  # the student's last
    ({"policy": "budget", "budget_ms": 1e6}, None),  # time to spare: as the confidence policy
]


def _expected_exits(case, per_exit, thresholds):
    index = case[1]
    return _confident_exit(per_exit, thresholds) if index is None else np.full(len(IMAGES), index)


# -- export and the manifest ---------------------------------------------------------------------
def test_composed_manifest_has_the_image_stage_and_counts_macs_through_the_cascade(checkpoints, composed):
    manifest = read_manifest(composed)
    student, full = (read_checkpoint_meta(path) for path in checkpoints)
    assert manifest.model == NAME and manifest.exit_depths == DEPTHS
    assert [entry.stage_input for entry in manifest.exits] == ["previous", "previous", "image", "previous",
                                                                "previous"]
    assert manifest.image_stages == frozenset({2})
    # The student's last served exit (depth 8; its exit 1 is not served, so its head is not run): what a
    # sample reaching the full net paid is that exit alone plus the head of exit 0.
    paid = student.exits[2]
    head0 = student.exits[1].macs - student.exits[1].standalone_macs
    paid_macs = paid.standalone_macs + head0
    assert paid_macs < paid.macs
    assert [entry.macs for entry in manifest.exits] == [student.exits[0].macs, paid_macs] + [
        paid_macs + own.macs for own in full.exits]
    assert [entry.params for entry in manifest.exits[2:]] == [paid.params + own.params for own in full.exits]
    own_macs = [own.macs if own.standalone_macs is None else own.standalone_macs for own in full.exits]
    assert [entry.standalone_macs for entry in manifest.exits[2:]] == own_macs
    assert manifest.full_macs == own_macs[-1]  # the baseline: the full network alone
    assert student.exits[-1].macs < full.exits[-1].macs / 2  # a cheap student (group:2, shallower)
    assert [entry.heldout_acc for entry in manifest.exits] == [student.heldout_acc[0], student.heldout_acc[2],
                                                                *full.heldout_acc]
    segments = [entry.segment_model for entry in manifest.exits]
    assert [model.name for model in segments] == [f"{NAME}_seg0to3", f"{NAME}_seg3to8", f"{NAME}_seg8to15",
                                                  f"{NAME}_seg15to21", f"{NAME}_seg21to28"]
    assert [spec.name for spec in segments[1].outputs] == ["logits"]  # the student's last stage: no boundary
    assert segments[2].inputs[0].name == "images" and segments[2].inputs[0].shape == manifest.input.shape
    assert segments[3].inputs[0].name == "features_in"
    assert manifest.source["checkpoint"] == str(checkpoints[0])
    assert [stage["model"] for stage in manifest.source["stages"]] == ["mwresnet8_3", "mwresnet20_3"]
    assert [stage["exits"] for stage in manifest.source["stages"]] == [[3, 8], [7, 13, 20]]
    for model in segments + [entry.exit_model for entry in manifest.exits]:
        assert (composed / model.name / "config.pbtxt").exists()
        assert (composed / model.name / str(model.version) / "model.onnx").exists()
    assert (composed / CASCADE / "config.pbtxt").exists()


def test_the_onnx_chain_answers_as_pytorch_and_as_the_per_exit_models(checkpoints, composed, per_exit):
    import torch

    from training.checkpoint import load_checkpoint

    manifest = read_manifest(composed)
    outputs = compute_exit_outputs(composed, manifest, IMAGES, np.zeros(len(IMAGES), int), threads=1,
                                   progress=False)
    images = torch.from_numpy(normalise_uint8(IMAGES, manifest.mean, manifest.std))
    expected = []
    for path, depths in ((checkpoints[0], (3, 8)), (checkpoints[1], (7, 13, 20))):
        model, _ = load_checkpoint(path)
        with torch.no_grad():
            logits = model.eval()(images)
        expected += [logits[model.exit_index(depth)].numpy() for depth in depths]
    np.testing.assert_allclose(outputs.logits, np.stack(expected), atol=1e-4)
    np.testing.assert_allclose(outputs.logits, per_exit, atol=1e-4)


def test_manifest_round_trip_and_old_manifests_load_unchanged(composed, tiny_repository):
    manifest = read_manifest(composed)
    raw = json.loads((composed / MANIFEST_FILE).read_text())
    assert Manifest.from_dict(raw) == manifest and Manifest.from_dict(manifest.to_dict()) == manifest
    assert [entry.get("stage_input") for entry in raw["exits"]] == [None, None, "image", None, None]
    old = json.loads((tiny_repository / MANIFEST_FILE).read_text())  # no image stage: no field at all
    assert all("stage_input" not in entry for entry in old["exits"])
    loaded = Manifest.from_dict(old)
    assert loaded.image_stages == frozenset() and {entry.stage_input for entry in loaded.exits} == {"previous"}
    assert loaded.to_dict() == old  # written back exactly as it was


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["exits"][2].update(stage_input="activations"), "stage_input 'activations' is not one of"),
    (lambda raw: raw["exits"][3].update(stage_input="image"), "must take 'images'"),
    (lambda raw: raw["exits"][1]["segment_model"]["outputs"].append({"name": "features", "shape": [16, 32, 32]}),
     "must output logits only"),
])
def test_a_wrong_stage_input_is_a_manifest_error(composed, change, message):
    raw = json.loads((composed / MANIFEST_FILE).read_text())
    change(raw)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(raw)


def test_stage_arguments_and_the_cli(tmp_path):
    assert parse_stage("a/b.safetensors:15, 25") == StageSpec(Path("a/b.safetensors"), "15, 25")
    assert parse_stage("c:/odd:name.safetensors").exits is None
    assert "--stage" in run_module("export.compose", "--help").stdout
    result = run_module("export.compose", "--stage", "x.safetensors", "--name", "m", "--model-repository",
                        str(tmp_path / "r"))
    assert result.returncode == 2 and "at least two --stage" in result.stderr


def test_incompatible_checkpoints_are_refused(checkpoints, imagefolder, tmp_path):
    other = save_tiny_checkpoint(imagefolder, tmp_path / "other.safetensors", "mwresnet8_3")
    meta = json.loads(other.with_suffix(".json").read_text())
    meta["heldout"]["seed"] = 5
    other.with_suffix(".json").write_text(json.dumps(meta))
    from common.errors import UserError

    with pytest.raises(UserError, match="held-out split"):
        compose_cascade([StageSpec(checkpoints[0]), StageSpec(other)], "m", tmp_path / "r", validation_images=4,
                        log=lambda message: None)
    assert not (tmp_path / "r").exists()


# -- the gateway's cascade -----------------------------------------------------------------------
def _run_cases(backend, plan, images, cases) -> list[tuple[np.ndarray, np.ndarray]]:
    """(exit index, logits) of every image under each case's request parameters, through a Cascade;
    requests of several sizes at once, so continuing samples of several requests share batches."""
    async def run():
        cascade = Cascade(backend, plan, CascadeSettings(max_batch_size=8), GatewayMetrics())
        await cascade.start(warmup_input=images[:1])
        jobs = [cascade.infer(images[start:stop], resolve_options(RequestOptions(**parameters), plan))
                for parameters in cases for start, stop in ((0, 1), (1, 13), (13, 24))]
        results = await asyncio.gather(*jobs)
        await cascade.stop()
        return results

    results = asyncio.run(run())
    return [(np.concatenate([part.exit_index for part in results[3 * k: 3 * k + 3]]),
             np.concatenate([part.logits for part in results[3 * k: 3 * k + 3]])) for k in range(len(cases))]


@pytest.mark.parametrize("direct", [True, False], ids=["per-exit-models", "segments-only"])
def test_the_cascade_gives_the_image_stage_the_requests_images_for_every_policy(composed, per_exit, thresholds,
                                                                                  direct):
    manifest = read_manifest(composed)
    plan = ExitPlan(tuple(manifest.exit_depths), tuple(thresholds))
    images = normalise_uint8(IMAGES, manifest.mean, manifest.std)
    cases = [*POLICY_CASES, ({"policy": "budget", "budget_ms": 1e-3}, 0)]  # no time: the first exit
    backend = OnnxRuntimeBackend(composed, manifest)
    if not direct:  # fixed and full through the segment chain (its image stage) instead of one call
        backend.has_exit_models = False

    for case, (exits, logits) in zip(cases, _run_cases(backend, plan, images, [case[0] for case in cases])):
        expected = _expected_exits(case, per_exit, thresholds)
        assert exits.tolist() == expected.tolist(), case
        np.testing.assert_allclose(logits, per_exit[exits, np.arange(len(IMAGES))], atol=1e-4)
    confident = _confident_exit(per_exit, thresholds)
    assert set(confident.tolist()) & {0, 1} and set(confident.tolist()) & {2, 3, 4}  # both networks answer


def _ask(module, url, model, parameters):
    client = module.InferenceServerClient(url)
    tensor = module.InferInput("images", list(IMAGES.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGES)
    result = client.infer(model, [tensor], parameters=parameters)
    return result.as_numpy("logits"), result.as_numpy("exit_depth")


def _assert_answers(answer, case, per_exit, thresholds):
    logits, depths = answer
    exits = _expected_exits(case, per_exit, thresholds)
    assert depths.tolist() == [DEPTHS[index] for index in exits], case
    np.testing.assert_allclose(logits, per_exit[exits, np.arange(len(IMAGES))], atol=1e-4)


def test_the_gateway_answers_each_image_as_the_per_exit_model_of_its_exit(calibrated, per_exit, thresholds,
                                                                          tmp_path):
    import tritonclient.http as httpclient

    with GatewayProcess(calibrated, log_path=tmp_path / "gateway.log") as gateway:
        for case in POLICY_CASES:
            _assert_answers(_ask(httpclient, gateway.http_url, NAME, case[0]), case, per_exit, thresholds)


# -- the Triton cascade model --------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_triton_runs_the_image_stage_in_the_cascade_model_in_both_modes_and_for_the_gateway(
        calibrated, per_exit, thresholds, mode, triton_venv, tmp_path):
    import tritonclient.grpc as grpcclient

    from benchmarks.triton_launcher import TritonServer

    repository = tmp_path / "repo"
    shutil.copytree(calibrated, repository, copy_function=os.link)
    config = repository / CASCADE / "config.pbtxt"
    text = (repository / CASCADE / "configs" / f"{mode}.pbtxt").read_text()
    config.unlink()  # hard-linked: replace, never write through
    config.write_text(text)
    with TritonServer(repository, triton_venv, log_path=tmp_path / "tritonserver.log") as server:
        for case in POLICY_CASES:
            parameters = {key: str(value) if key == "budget_ms" else value for key, value in case[0].items()}
            _assert_answers(_ask(grpcclient, server.grpc_url, CASCADE, parameters), case, per_exit, thresholds)
        if mode != MODES[0]:
            return  # one mode is enough for the gateway's stage-by-stage Triton backend
        with GatewayProcess(repository, "--backend", "triton", "--triton-url", server.grpc_url,
                            log_path=tmp_path / "gateway.log") as gateway:  # each segment a call to Triton
            for case in POLICY_CASES:
                _assert_answers(_ask(grpcclient, gateway.grpc_url, NAME, case[0]), case, per_exit, thresholds)


# -- benchmarks ----------------------------------------------------------------------------------
def test_calibrate_and_the_offline_sweep_on_the_composed_repository(composed, tmp_path):
    from benchmarks.sweep import offline_sweep

    repository = tmp_path / "repo"
    shutil.copytree(composed, repository, copy_function=os.link)  # calibrate replaces the manifest by rename
    result = run_module("benchmarks.calibrate", "--model-repository", str(repository), "--max-drop", "5",
                        "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(repository)
    assert all(entry.threshold is not None for entry in manifest.exits) and manifest.image_stages == {2}
    assert manifest.calibration["heldout_exit_share"] and len(manifest.calibration["heldout_exit_share"]) == 5
    heldout = compute_exit_outputs(repository, manifest, *load_images(manifest, "heldout"), progress=False)
    test = compute_exit_outputs(repository, manifest, *load_images(manifest, "test"), progress=False)
    rows = offline_sweep(manifest, heldout, test, drops_pt=(0.0, 5.0), budgets=(0.5,))
    fixed = {row["target"]: row["macs_fraction"] for row in rows if row["kind"] == "fixed_exit"}
    assert fixed[DEPTHS[-1]] == pytest.approx(1.0)  # the full network alone is the baseline
    assert fixed[DEPTHS[0]] < fixed[DEPTHS[2]] < 1.0
    oracle = next(row for row in rows if row["kind"] == "oracle")
    macs = np.asarray([entry.macs for entry in manifest.exits], np.float64)
    first_correct = np.where(test.correct().any(axis=0), test.correct().argmax(axis=0), len(DEPTHS) - 1)
    assert oracle["mean_macs"] == pytest.approx(macs[first_correct].mean())  # paid through the cascade


def test_the_benchmark_runner_on_the_composed_repository(composed, triton_venv, tmp_path):
    """benchmarks.run end to end (offline sweep, gateway on ONNX Runtime and on Triton, the Triton cascade
    model): every scenario's requests answered without error."""
    from benchmarks.run import Plan, run_benchmark

    plan = Plan(concurrency=(2,), headline_concurrency=2, requests=12, seconds=2.0, rates=(10.0,),
                budget_factors=(2.0,), images=30)
    output = tmp_path / "out"
    summary = run_benchmark(composed, output, plan, triton_venv, "test", log=lambda message: None, pin=False)
    calibration = json.loads((output / "calibration.json").read_text())
    assert calibration["exit_depths"] == DEPTHS and all(t is not None for t in calibration["thresholds"])
    assert np.isfinite(summary["mean_macs_fraction"]) and summary["final_exit_test_acc"] is not None
    served = {"early_gateway_onnxruntime", "early_gateway_triton", "early_triton_cascade_direct",
              "early_gateway_triton_cascade", "budget2x_gateway_onnxruntime", "fixed3_gateway_onnxruntime"}
    assert not served & set(summary["skipped_scenarios"])
    scenarios = list(output.glob("scenario_*.json"))
    assert {f"scenario_{name}.json" for name in served} <= {path.name for path in scenarios}
    for path in scenarios:
        for row in json.loads(path.read_text()):
            assert row["completed"] + row["errors"] == row["sent"] and row["errors"] == 0, path.name


# -- exit ensembles on the composed cascade (issue 20) ---------------------------------------------
ENSEMBLES = [[1.0], [0.3, 1.0], [0.1, 0.2, 0.9], [0.0, 0.1, 0.4, 0.8], [0.0, 0.0, 0.3, 0.3, 0.6]]


@pytest.fixture(scope="module")
def served(per_exit):
    """(exits, images, classes): what the cascade answers at each exit with ENSEMBLES."""
    return ExitOutputs(per_exit, np.zeros(len(IMAGES), int), tuple(ENSEMBLES)).served()


@pytest.fixture(scope="module")
def ensembled(composed, served, tmp_path_factory):
    """A linked copy of the composed repository with ENSEMBLES and thresholds on their scores."""
    repository = tmp_path_factory.mktemp("ensembled_composed") / "repo"
    shutil.copytree(composed, repository, copy_function=os.link)
    thresholds = [float(np.sort(row)[len(row) // 3 - 1: len(row) // 3 + 1].mean()) for row in _scores(served)]
    write_manifest(repository, apply_thresholds(read_manifest(repository), thresholds, {}, ensembles=ENSEMBLES))
    return repository, thresholds


def _assert_ensembled(exits, logits, parameters, served, per_exit, thresholds, direct=False):
    """Confidence-like policies leave at the first confident ensemble; a per-exit model called directly
    answers alone; stage by stage, every answer is the ensemble's."""
    policy = parameters.get("policy", "confidence")
    if policy in ("fixed", "full"):
        expected = np.full(len(IMAGES), len(DEPTHS) - 1 if policy == "full" else DEPTHS.index(parameters["exit_depth"]))
    else:
        expected = _confident_exit(served, thresholds)
    assert exits.tolist() == expected.tolist(), parameters
    source = per_exit if direct and policy in ("fixed", "full") else served
    np.testing.assert_allclose(logits, source[expected, np.arange(len(IMAGES))], atol=2e-4)


@pytest.mark.parametrize("direct", [True, False], ids=["per-exit-models", "segments-only"])
def test_the_cascade_answers_with_exit_ensembles(ensembled, served, per_exit, direct):
    repository, thresholds = ensembled
    manifest = read_manifest(repository)
    plan = exit_plan(manifest)
    assert plan.ensembles is not None
    images = normalise_uint8(IMAGES, manifest.mean, manifest.std)
    backend = OnnxRuntimeBackend(repository, manifest)
    if not direct:
        backend.has_exit_models = False
    cases = [case[0] for case in POLICY_CASES]
    for parameters, (exits, logits) in zip(cases, _run_cases(backend, plan, images, cases)):
        _assert_ensembled(exits, logits, parameters, served, per_exit, thresholds, direct)
    confident = _confident_exit(served, thresholds)
    assert set(confident.tolist()) & {0, 1} and set(confident.tolist()) & {2, 3, 4}


def test_the_triton_cascade_model_answers_with_exit_ensembles(ensembled, served, per_exit, triton_venv, tmp_path):
    import tritonclient.grpc as grpcclient

    from benchmarks.triton_launcher import TritonServer

    repository, thresholds = ensembled
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy, copy_function=os.link)
    with TritonServer(copy, triton_venv, log_path=tmp_path / "tritonserver.log") as server:
        for parameters in ({}, {"policy": "full"}, {"policy": "fixed", "exit_depth": 8}):
            logits, depths = _ask(grpcclient, server.grpc_url, CASCADE, parameters)
            _assert_ensembled(np.array([DEPTHS.index(d) for d in depths]), logits, parameters, served, per_exit,
                              thresholds)
