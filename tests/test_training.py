import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint_meta import FORMAT_VERSION, CheckpointMeta, CheckpointMetaError
from common.paths import REPO_ROOT
from training.checkpoint import build_metadata, load_checkpoint, load_metadata, save_checkpoint
from training.models import create_model

from .conftest import run_module

TINY = ["--model", "mwresnet8_3", "--width", "4", "--heldout-size", "30", "--batch-size", "45",
        "--no-progress", "--threads", "1"]


def train(data, output, *extra, env=None):
    result = run_module("training.train", *TINY, "--data", str(data), "--output", str(output), *extra, env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_two_step_training_writes_a_complete_checkpoint(imagefolder, tmp_path):
    checkpoint = tmp_path / "tiny.safetensors"
    result = train(imagefolder, checkpoint, "--epochs", "1", "--exit-weights", "0.5,1,1", "--distill-weight", "0.5",
                   "--cutout", "8")
    assert "epoch 1:" in result.stdout
    meta = load_metadata(checkpoint)
    assert meta.model == "mwresnet8_3" and meta.classes == ["cat", "dog", "ship"]
    assert meta.input_size == [3, 32, 32]
    assert [e.depth for e in meta.exits] == [3, 5, 8]
    assert all(e.macs > 0 and e.params > 0 for e in meta.exits)
    assert meta.heldout.seed == 0 and meta.heldout.size == 30
    assert meta.training["exit_weights"] == [0.5, 1.0, 1.0]
    assert meta.training["distill_weight"] == 0.5 and meta.training["cutout"] == 8
    assert len(meta.normalization.mean) == 3 and meta.git_commit and meta.date
    on_disk = json.loads(checkpoint.with_suffix(".json").read_text())
    assert on_disk["format_version"] == 1 and on_disk["epochs_completed"] == 1
    assert set(on_disk["training"]) >= {"model", "width", "data", "schedule", "lr", "exit_weights", "world_size",
                                        "model_kwargs", "device", "init_from", "amp", "freeze_trunk"}
    log = [json.loads(line) for line in checkpoint.with_suffix(".log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and len(log[0]["heldout_acc"]) == 3
    model, _ = load_checkpoint(checkpoint)
    assert not model.training


def test_resume_continues_the_same_schedule(imagefolder, tmp_path):
    straight = tmp_path / "straight" / "m.safetensors"
    train(imagefolder, straight, "--epochs", "2")
    resumed = tmp_path / "resumed" / "m.safetensors"
    first = train(imagefolder, resumed, "--epochs", "2", "--stop-after", "1")
    assert "epoch 2:" not in first.stdout
    assert load_metadata(resumed).epochs_completed == 1
    second = train(imagefolder, resumed, "--epochs", "2", "--resume")
    assert "resumed" in second.stdout and "epoch 2:" in second.stdout
    a, b = load_file(str(straight)), load_file(str(resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert load_metadata(resumed).epochs_completed == 2


def test_checkpoint_round_trip(tmp_path):
    model = create_model("mwresnet8_3", num_classes=3, width=4).eval()
    meta = build_metadata(model, classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3,
                          heldout={"seed": 0, "size": 10}, training={"model_kwargs": {"width": 4}},
                          epochs_completed=3)
    meta = meta.updated(extra={"averaged_from": [{"path": "x", "epochs_completed": 1}]})
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert json.loads(path.with_suffix(".json").read_text())["averaged_from"] == [{"path": "x", "epochs_completed": 1}]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_reference_metadata_loads_and_round_trips_with_its_keys():
    on_disk = json.loads((REPO_ROOT / "checkpoints" / "mwresnet56_5.json").read_text())
    meta = CheckpointMeta.from_dict(on_disk)
    assert [e.depth for e in meta.exits] == [15, 25, 35, 45, 56]
    assert meta.model_kwargs == {"width": 16, "early_head": "conv2"}
    assert meta.to_dict() == on_disk and list(meta.to_dict()) == list(on_disk)


@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": FORMAT_VERSION + 1}, "format_version"),
    ({"format_version": None}, "format_version"),
    ({"normalization": None}, "normalization"),
    ({"model": None}, "model"),
])
def test_checkpoint_metadata_of_another_format_is_a_clear_error(change, message):
    data = json.loads((REPO_ROOT / "checkpoints" / "mwresnet56_5.json").read_text())
    data = {**data, **change}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(CheckpointMetaError, match=message):
        CheckpointMeta.from_dict(data)


def test_evaluate_writes_per_exit_tables(imagefolder, tmp_path):
    checkpoint = tmp_path / "tiny.safetensors"
    train(imagefolder, checkpoint, "--epochs", "3")
    result = run_module("training.evaluate", "--checkpoint", str(checkpoint), "--data", str(imagefolder))
    assert result.returncode == 0, result.stderr
    assert "| exit depth |" in result.stdout
    report = json.loads((tmp_path / "tiny.eval.json").read_text())
    assert [row["depth"] for row in report["exits"]] == [3, 5, 8]
    for row in report["exits"]:
        assert set(row) >= {"depth", "params", "macs", "heldout_acc", "test_acc"}
        assert 0.0 <= row["test_acc"] <= 1.0
    assert report["exits"][-1]["macs_fraction"] == 1.0
    assert report["heldout"]["size"] == 30 and report["test_size"] == 30
    # The class squares are easy: three epochs learn them.
    assert report["exits"][-1]["test_acc"] > 0.5
    assert (tmp_path / "tiny.eval.md").read_text().startswith("# mwresnet8_3")


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("training.train", ["--data", "{folder}", "--model", "nope"], "unknown model 'nope'; known models:"),
        ("training.train", ["--data", "/does/not/exist"], "dataset not found"),
        ("training.train", ["--data", "{junk}"], "cannot tell the format"),
        ("training.train", ["--data", "{folder}", "--exit-weights", "1,2"], "3 exits"),
        ("training.train", ["--data", "{folder}", "--resume"], "does not exist"),
        ("training.train", ["--data", "{folder}", "--cutout", "-1"], "--cutout must be"),
        ("training.evaluate", ["--checkpoint", "/no/such.safetensors"], "checkpoint not found"),
    ],
)
def test_bad_input_is_one_line_error(module, args, message, imagefolder, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk")
    args = [a.format(junk=junk, folder=imagefolder) for a in args]
    # For train, the case's own arguments come last and win over the tiny defaults.
    extra = TINY + ["--output", str(tmp_path / "x.safetensors")] if module == "training.train" else []
    result = run_module(module, *extra, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_torchrun_two_cpu_processes(imagefolder, tmp_path):
    checkpoint = tmp_path / "ddp.safetensors"
    result = run_module("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "training.train", *TINY, "--data", str(imagefolder),
                        "--output", str(checkpoint), "--epochs", "1",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[:3000]
    meta = load_metadata(checkpoint)
    assert meta.training["world_size"] == 2 and meta.epochs_completed == 1


def test_init_from_starts_a_fresh_schedule_from_trained_weights(imagefolder, tmp_path):
    first = tmp_path / "first.safetensors"
    train(imagefolder, first, "--epochs", "1")
    second = tmp_path / "second.safetensors"
    result = train(imagefolder, second, "--epochs", "1", "--init-from", str(first), "--amp", "bf16")
    assert "initialised from" in result.stdout
    meta = load_metadata(second)
    assert meta.training["init_from"]["epochs_completed"] == 1
    assert meta.training["amp"] == "bf16" and meta.epochs_completed == 1
    # One more epoch moved the weights away from the starting point.
    a, b = load_file(str(first)), load_file(str(second))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("extra", "message"), [
    (["--heldout-seed", "1"], "held-out split"),
    (["--width", "8"], "width 4"),
    (["--early-head", "conv1"], "linear early heads"),
    (["--amp", "fp16"], "needs CUDA"),
])
def test_init_from_and_amp_refuse_what_does_not_fit(imagefolder, tmp_path, extra, message):
    first = tmp_path / "first.safetensors"
    train(imagefolder, first, "--epochs", "1")
    result = run_module("training.train", *TINY, "--data", str(imagefolder),
                        "--output", str(tmp_path / "x.safetensors"), "--init-from", str(first), *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_constant_schedule_snapshots_and_weight_averaging(imagefolder, tmp_path):
    run_dir = tmp_path / "run"
    train(imagefolder, run_dir / "m.safetensors", "--epochs", "2", "--schedule", "constant",
          "--lr", "0.03", "--snapshots")
    log = [json.loads(line) for line in (run_dir / "m.log.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 6) for r in log] == [0.03, 0.03]
    snapshots = sorted((run_dir / "m.snapshots").glob("epoch_*.safetensors"))
    assert [p.name for p in snapshots] == ["epoch_001.safetensors", "epoch_002.safetensors"]
    averaged = tmp_path / "avg.safetensors"
    result = run_module("training.average", *map(str, snapshots), "--output", str(averaged),
                        "--no-progress", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "averaged 2 checkpoints; held-out acc 3:" in result.stdout
    a, b, avg = (load_file(str(p)) for p in (*snapshots, averaged))
    weight = "stem.weight" if "stem.weight" in a else next(k for k in a if k.endswith("conv1.weight"))
    torch.testing.assert_close(avg[weight], (a[weight] + b[weight]) / 2)
    # Batch-norm statistics come from a fresh pass, not from averaging the snapshots'.
    running = next(k for k in a if k.endswith("running_var"))
    assert not torch.allclose(avg[running], (a[running] + b[running]) / 2)
    meta = load_metadata(averaged)
    assert [e["epochs_completed"] for e in meta.extra["averaged_from"]] == [1, 2]
    assert len(meta.heldout_acc) == 3 and meta.extra["batchnorm_recomputed_on"]["images"] == 90
    model, _ = load_checkpoint(averaged)
    assert not model.training


def test_average_refuses_checkpoints_of_different_runs(imagefolder, tmp_path):
    first, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(imagefolder, first, "--epochs", "1")
    train(imagefolder, other, "--epochs", "1", "--heldout-seed", "3")
    result = run_module("training.average", str(first), str(other), "--output", str(tmp_path / "c.safetensors"))
    assert result.returncode == 2 and "only checkpoints of one run" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_module("training.average", str(first), "--output", str(first))
    assert result.returncode == 2 and "must not be one of" in result.stderr


def test_freeze_trunk_trains_only_the_early_heads(imagefolder, tmp_path):
    first = tmp_path / "first.safetensors"
    train(imagefolder, first, "--epochs", "1")
    refit = tmp_path / "refit.safetensors"
    train(imagefolder, refit, "--epochs", "1", "--init-from", str(first), "--freeze-trunk", "--lr", "0.05")
    a, b = load_file(str(first)), load_file(str(refit))
    frozen = [k for k in a if not k.startswith(("heads.0.", "heads.1."))]
    assert any(k.startswith("heads.2.") for k in frozen) and any(k.endswith("running_mean") for k in frozen)
    for key in frozen:  # trunk and final exit unchanged, batch-norm statistics included
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["heads.0.fc.weight"], b["heads.0.fc.weight"])
    assert not torch.equal(a["heads.1.bn.running_mean"], b["heads.1.bn.running_mean"])
    assert load_metadata(refit).training["freeze_trunk"] is True
    result = run_module("training.train", *TINY, "--data", str(imagefolder),
                        "--output", str(tmp_path / "x.safetensors"), "--freeze-trunk")
    assert result.returncode == 2 and "needs trained weights" in result.stderr


def test_early_heads_with_convolutions_train_and_are_recorded(imagefolder, tmp_path):
    output = tmp_path / "conv.safetensors"
    train(imagefolder, output, "--epochs", "1", "--early-head", "conv1", "--distill-weight", "0.5")
    meta = load_metadata(output)
    assert meta.model_kwargs == {"width": 4, "early_head": "conv1"} and meta.training["early_head"] == "conv1"
    assert meta.exits[0].macs > meta.exits[0].standalone_macs or meta.exits[1].macs > meta.exits[1].standalone_macs
    from training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(output)
    assert type(model.heads[0]).__name__ == "ConvExitHead" and type(model.heads[-1]).__name__ == "ExitHead"


def test_epoch_images_makes_short_epochs_of_a_new_draw(imagefolder, tmp_path):
    checkpoint = tmp_path / "short.safetensors"
    train(imagefolder, checkpoint, "--epochs", "2", "--epoch-images", "20", "--batch-size", "10")
    state = torch.load(checkpoint.with_suffix(".resume.pt"), weights_only=False)
    assert state["scheduler"]["last_epoch"] == 2 * 2  # two epochs of ceil(20 / 10) steps, not of the whole set
    assert load_metadata(checkpoint).training["epoch_images"] == 20
    result = run_module("training.train", *TINY, "--data", str(imagefolder), "--output", str(checkpoint),
                        "--epoch-images", "-5")
    assert result.returncode != 0 and "--epoch-images must be positive" in result.stderr


def test_image_size_takes_height_and_width(imagefolder, tmp_path):
    checkpoint = tmp_path / "wide.safetensors"
    train(imagefolder, checkpoint, "--epochs", "1", "--image-size", "16,24")
    meta = load_metadata(checkpoint)
    assert meta.input_size == [3, 16, 24] and meta.training["image_size"] == [16, 24]
    model, _ = load_checkpoint(checkpoint)
    assert [out.shape for out in model(torch.zeros(2, 3, 16, 24))] == [(2, 3)] * 3
    result = run_module("training.train", *TINY, "--data", str(imagefolder), "--output", str(checkpoint),
                        "--image-size", "16,24,3")
    assert result.returncode != 0 and "is not PIXELS or H,W" in result.stderr


def test_a_teacher_checkpoint_distils_every_exit_and_is_recorded(imagefolder, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    train(imagefolder, teacher, "--epochs", "1", "--model", "mwresnet20_3")
    student = tmp_path / "student.safetensors"
    train(imagefolder, student, "--epochs", "1", "--teacher", str(teacher), "--teacher-weight", "0.7")
    meta = load_metadata(student)
    assert meta.training["teacher"]["path"] == str(teacher) and meta.training["teacher"]["model"] == "mwresnet20_3"
    assert meta.training["teacher_weight"] == 0.7 and meta.model == "mwresnet8_3"
    alone = tmp_path / "alone.safetensors"
    train(imagefolder, alone, "--epochs", "1")  # the same run without the teacher ends elsewhere
    a, b = load_file(str(student)), load_file(str(alone))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for extra, message in [(["--heldout-seed", "1"], "another held-out split"),
                           (["--teacher-weight", "-1"], "--teacher-weight must be")]:
        result = run_module("training.train", *TINY, "--data", str(imagefolder), "--output",
                            str(tmp_path / "x.safetensors"), "--teacher", str(teacher), *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_with_a_teacher_matches_eager(imagefolder, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    train(imagefolder, teacher, "--epochs", "1", "--model", "mwresnet20_3")
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = tmp_path / mode / "m.safetensors"
        train(imagefolder, runs[mode], "--epochs", "1", "--teacher", str(teacher), "--compile", mode)
    assert load_metadata(runs["on"]).training["compile"] == "on"
    eager, compiled = load_file(str(runs["off"])), load_file(str(runs["on"]))
    assert eager.keys() == compiled.keys()  # the uncompiled module is saved: no wrapper prefixes
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)
    losses = [json.loads(runs[m].with_suffix(".log.jsonl").read_text())["train_loss"] for m in ("off", "on")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
