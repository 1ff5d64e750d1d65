import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from common.errors import UserError
from common.manifest import MANIFEST_FILE, Manifest, read_manifest
from common.onnxruntime_session import create_session
from export import repository as repository_module
from export.onnx_export import export_and_validate, validation_images
from export.pipeline import ExportOptions, export_checkpoint, parse_exit_depths
from export.tensorrt_build import EngineSettings, profile_shapes
from export.triton_config import BatchingConfig
from training.checkpoint import load_checkpoint

from .conftest import REPO_ROOT

QUIET = {"log": lambda message: None}


def _version_dir(repository, model):
    return repository / model.name / str(model.version)


def test_both_forms_match_pytorch_and_the_segment_chain_matches_per_exit_models(tiny_checkpoint, tiny_repository):
    model, meta = load_checkpoint(tiny_checkpoint)
    images = validation_images(meta, None, 30)
    manifest = read_manifest(tiny_repository)
    assert manifest.exit_depths == [3, 5, 8]
    features = images
    for entry in manifest.exits:
        per_exit = create_session(str(_version_dir(tiny_repository, entry.exit_model) / "model.onnx"))
        (exit_logits,) = per_exit.run(None, {"images": images})
        segment = create_session(str(_version_dir(tiny_repository, entry.segment_model) / "model.onnx"))
        outputs = segment.run(None, {entry.segment_model.inputs[0].name: features})
        np.testing.assert_allclose(outputs[0], exit_logits, atol=1e-4)
        if len(outputs) > 1:
            features = outputs[1]
            assert list(features.shape[1:]) == entry.segment_model.output("features").shape
    exported = export_and_validate(model, images, [0, 2])
    assert {(m.kind, m.exit_index) for m in exported} == {("exit", 0), ("exit", 2), ("segment", 0), ("segment", 2)}
    assert all(m.max_abs_error <= 1e-4 and m.top1_agreement == 1.0 for m in exported)


def test_configs_parse_as_triton_model_config_and_match_the_onnx_files(tiny_repository):
    manifest = read_manifest(tiny_repository)
    for entry in manifest.exits:
        for deployed in (entry.exit_model, entry.segment_model):
            text = (tiny_repository / deployed.name / "config.pbtxt").read_text()
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
            assert config.name == deployed.name and config.backend == "python"
            assert config.max_batch_size == 64
            assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
            graph = onnx.load(str(_version_dir(tiny_repository, deployed) / "model.onnx")).graph
            onnx_inputs = {t.name: [d.dim_value for d in t.type.tensor_type.shape.dim][1:] for t in graph.input}
            onnx_outputs = {t.name: [d.dim_value for d in t.type.tensor_type.shape.dim][1:] for t in graph.output}
            assert {t.name: list(t.dims) for t in config.input} == onnx_inputs
            assert {t.name: list(t.dims) for t in config.output} == onnx_outputs
            assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in [*config.input, *config.output])
            assert (_version_dir(tiny_repository, deployed) / "model.py").exists()


def test_manifest_round_trip(tiny_repository):
    manifest = read_manifest(tiny_repository)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.classes == ["cat", "dog", "ship"] and manifest.input.shape == [3, 32, 32]
    assert [e.heldout_acc for e in manifest.exits] == [0.4, 0.5, 0.6]
    assert all(e.threshold is None and e.latency_ms == {} for e in manifest.exits)
    assert manifest.exits[1].segment_model.name == "mwresnet8_3_seg3to5"
    assert manifest.exits[1].exit_model.name == "mwresnet8_3_exit5"
    assert manifest.source["validation"]["max_abs_error"] <= 1e-4
    data = manifest.to_dict()
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema version 99"):
        Manifest.from_dict(data)


def test_chosen_exits_get_segments_spanning_the_skipped_ones(tiny_checkpoint, tmp_path):
    options = ExportOptions(tiny_checkpoint, "3,8", tmp_path / "repo", validation_images=20)
    manifest = export_checkpoint(options, **QUIET)
    assert [e.segment_model.name for e in manifest.exits] == ["mwresnet8_3_seg0to3", "mwresnet8_3_seg3to8"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()) == [
        "mwresnet8_3_cascade", "mwresnet8_3_exit3", "mwresnet8_3_exit8", "mwresnet8_3_seg0to3",
        "mwresnet8_3_seg3to8"]
    # The skipped exit's head is not in the segment (its output is unused, so the exporter drops it) and
    # its MACs are not in the manifest: exit 8 costs its per-exit model plus exit 3's head, not exit 5's.
    segment = onnx.load(str(_version_dir(tmp_path / "repo", manifest.exits[1].segment_model) / "model.onnx"))
    assert [node.op_type for node in segment.graph.node].count("Gemm") == 1
    _, meta = load_checkpoint(tiny_checkpoint)
    head3 = meta.exits[1].macs - meta.exits[1].standalone_macs  # exit 3's head: what exit 5 pays on top
    head5 = meta.exits[2].macs - meta.exits[2].standalone_macs - head3
    assert head3 > 0 and head5 > 0
    assert [e.macs for e in manifest.exits] == [meta.exits[0].macs, meta.exits[2].macs - head5]
    assert manifest.exits[1].macs == meta.exits[2].standalone_macs + head3


def test_new_export_adds_a_version_and_force_replaces(tiny_checkpoint, tmp_path):
    output = tmp_path / "repo"
    options = ExportOptions(tiny_checkpoint, "3,8", output, validation_images=20)
    export_checkpoint(options, **QUIET)
    first_onnx = (output / "mwresnet8_3_exit3" / "1" / "model.onnx").stat()
    second = export_checkpoint(options, **QUIET)
    assert second.exits[0].exit_model.version == 2
    assert sorted(p.name for p in (output / "mwresnet8_3_exit3").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (output / "mwresnet8_3_exit3" / "1" / "model.onnx").stat().st_ino == first_onnx.st_ino
    forced = export_checkpoint(ExportOptions(tiny_checkpoint, "3", output, validation_images=20, force=True), **QUIET)
    assert forced.exits[0].exit_model.version == 1
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "mwresnet8_3_cascade", "mwresnet8_3_exit3",
                                                        "mwresnet8_3_seg0to3"]


def test_failure_mid_export_leaves_the_previous_repository_intact(tiny_checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "repo"
    export_checkpoint(ExportOptions(tiny_checkpoint, "3,8", output, validation_images=20), **QUIET)
    before = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    manifest_before = (output / MANIFEST_FILE).read_text()
    calls = []
    real_write_model = repository_module._write_model

    def failing_write_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real_write_model(*args, **kwargs)

    monkeypatch.setattr(repository_module, "_write_model", failing_write_model)
    with pytest.raises(OSError, match="injected"):
        export_checkpoint(ExportOptions(tiny_checkpoint, "3,8", output, validation_images=20), **QUIET)
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == before
    assert (output / MANIFEST_FILE).read_text() == manifest_before
    assert not list(tmp_path.glob(".repo.staging-*"))


def test_export_killed_halfway_leaves_the_old_repository_loadable(tiny_checkpoint, tmp_path):
    output = tmp_path / "repo"
    export_checkpoint(ExportOptions(tiny_checkpoint, None, output, validation_images=20), **QUIET)
    manifest_before = (output / MANIFEST_FILE).read_text()
    process = subprocess.Popen(
        [sys.executable, "export/to_onnx.py", "--checkpoint", str(tiny_checkpoint), "--output", str(output),
         "--validation-images", "20"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("writing"):  # the staging directory is being filled
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert (output / MANIFEST_FILE).read_text() == manifest_before
    manifest = read_manifest(output)
    for entry in manifest.exits:
        create_session(str(_version_dir(output, entry.segment_model) / "model.onnx"))
        assert not (output / entry.segment_model.name / "2").exists()
    # The next export clears the dead process's staging directory.
    export_checkpoint(ExportOptions(tiny_checkpoint, "3", output, validation_images=20), **QUIET)
    assert not list(tmp_path.glob(".repo.staging-*"))


def test_tensorrt_backend_layout_with_a_stand_in_builder(tiny_checkpoint, tmp_path):
    def plan_builder(onnx_bytes, spec, name):
        return b"plan for " + name.encode()

    manifest = export_checkpoint(ExportOptions(tiny_checkpoint, "5", tmp_path / "trt", backend="tensorrt",
                                               validation_images=20), plan_builder=plan_builder, **QUIET)
    deployed = manifest.exits[0].exit_model
    version_dir = tmp_path / "trt" / deployed.name / "1"
    assert (version_dir / "model.plan").read_bytes() == b"plan for mwresnet8_3_exit5"
    assert not (version_dir / "model.onnx").exists()
    config = text_format.Parse((tmp_path / "trt" / deployed.name / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_onnxruntime_backend_config(tiny_checkpoint, tmp_path):
    manifest = export_checkpoint(ExportOptions(tiny_checkpoint, "3", tmp_path / "ort", backend="onnxruntime",
                                               validation_images=20,
                                               batching=BatchingConfig(16, (8, 16), 500, 2)), **QUIET)
    name = manifest.exits[0].exit_model.name
    config = text_format.Parse((tmp_path / "ort" / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 500 and config.instance_group[0].count == 2
    assert not (tmp_path / "ort" / name / "1" / "model.py").exists()


def test_tensorrt_profile_shapes_and_settings():
    from common.manifest import TensorSpec

    settings = EngineSettings(min_batch=1, opt_batch=8, max_batch=32)
    assert profile_shapes(TensorSpec("images", [3, 32, 32]), settings) == ((1, 3, 32, 32), (8, 3, 32, 32),
                                                                          (32, 3, 32, 32))
    with pytest.raises(UserError, match="min"):
        EngineSettings(min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(UserError):
        EngineSettings(precision="int3")


def test_to_trt_builds_plans_or_stops_before_writing(tiny_checkpoint, tmp_path):
    """Without TensorRT or CUDA: one line and nothing written. With both: a plan per model."""
    pytest.importorskip("torch")
    from export.tensorrt_build import TensorRTUnavailable, require_tensorrt

    output = tmp_path / "engines"
    result = subprocess.run([sys.executable, "export/to_trt.py", "--checkpoint", str(tiny_checkpoint),
                             "--exits", "3,8", "--output", str(output), "--timing-cache", str(tmp_path / "cache")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    try:
        require_tensorrt()
    except TensorRTUnavailable as missing:
        assert result.returncode == 2
        assert result.stderr == f"error: {missing}\n"
        assert "export/to_onnx.py" in result.stderr
        assert not output.exists()
        return
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(output)
    assert manifest.backend == "tensorrt" and manifest.exit_depths == [3, 8]
    for entry in manifest.exits:
        for deployed in (entry.exit_model, entry.segment_model):
            assert (_version_dir(output, deployed) / "model.plan").stat().st_size > 0


@pytest.mark.parametrize("version", ["12.0.1", "9.3.0", "unknown"])
def test_tensorrt_other_than_10_or_11_is_refused_with_one_line(monkeypatch, version):
    import re
    import types

    from export.tensorrt_build import TensorRTUnavailable, require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    with pytest.raises(TensorRTUnavailable, match=rf"TensorRT {re.escape(version)} is installed.*TensorRT 10 and 11"):
        require_tensorrt()


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_tensorrt_10_and_11_pass_the_version_check(monkeypatch, version):
    """Both releases get past the version check; on this CPU-only torch, the CUDA check then stops them."""
    import types

    from export.tensorrt_build import TensorRTUnavailable, require_tensorrt

    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match="no CUDA device"):
        require_tensorrt()


@pytest.mark.parametrize(("capability", "fast"), [((8, 0), True), ((9, 0), True), ((7, 5), True), ((6, 0), True),
                                                  ((6, 1), False), ((5, 2), False), ((5, 3), True)])
def test_fast_fp16_by_compute_capability(capability, fast):
    from export.tensorrt_build import has_fast_fp16

    assert has_fast_fp16(capability) is fast


@pytest.mark.parametrize(("args", "message"), [
    (["--exits", "3,4"], "no exit at depth 4; available depths: 3, 5, 8"),
    (["--exits", "x"], "comma-separated depths"),
    (["--checkpoint", "/nope.safetensors"], "checkpoint not found"),
])
def test_to_onnx_bad_input_is_one_line_error(args, message, tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "export/to_onnx.py", "--checkpoint", str(tiny_checkpoint),
                             "--output", str(tmp_path / "out"), *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_parse_exit_depths():
    assert parse_exit_depths(None, [3, 5, 8]) == [3, 5, 8]
    assert parse_exit_depths("8, 3", [3, 5, 8]) == [3, 8]


def test_profile_writes_latency_per_batch_size_into_the_manifest(tiny_checkpoint, tmp_path):
    from export.profile import main as profile_main

    output = tmp_path / "repo"
    export_checkpoint(ExportOptions(tiny_checkpoint, "3,8", output, validation_images=20), **QUIET)
    assert profile_main(["--model-repository", str(output), "--batch-sizes", "1,4", "--repeats", "2",
                         "--no-progress"]) == 0
    manifest = read_manifest(output)
    for entry in manifest.exits:
        assert set(entry.latency_ms) == {"segment_model", "exit_model"}
        assert set(entry.latency_ms["segment_model"]) == {"1", "4"}
        assert all(ms > 0 for ms in entry.latency_ms["exit_model"].values())
    assert manifest.profile["provider"] == "CPUExecutionProvider" and manifest.profile["intra_op_threads"] == 1
    assert manifest.profile["machine"] and manifest.profile["date"]


@pytest.mark.parametrize("text, message", [("{oops", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                           ('{"schema_version": 99}', "schema version 99")])
def test_a_broken_manifest_is_a_manifest_error(tmp_path, text, message):
    from common.manifest import ManifestError

    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_served_macs_counts_only_the_served_exits_heads():
    from common.checkpoint_meta import CheckpointExit, served_macs
    # trunk to each exit 10, 20, 30, 40; heads 1, 2, 3, 4 (macs: through the cascade, all earlier heads)
    trunk, heads = [10, 20, 30, 40], [1, 2, 3, 4]
    exits = [CheckpointExit(index=i, depth=i + 1, params=0, macs=trunk[i] + sum(heads[: i + 1]),
                            standalone_macs=trunk[i] + heads[i]) for i in range(4)]
    assert served_macs(exits, range(4)) == {i: e.macs for i, e in enumerate(exits)}  # all served: unchanged
    assert served_macs(exits, [0, 3]) == {0: 11, 3: 40 + 1 + 4}
    assert served_macs(exits, [1, 2]) == {1: 22, 2: 30 + 2 + 3}
    assert served_macs(exits, [3]) == {3: 44}
    older = [CheckpointExit(index=0, depth=1, params=0, macs=11), CheckpointExit(index=1, depth=2, params=0, macs=33)]
    assert served_macs(older, [1]) == {1: 33}  # no standalone figures: taken as written
