"""Head refits on a frozen trunk (training.refit_heads) on a tiny real model and dataset."""

import pytest
import torch

from common.errors import UserError
from tests.conftest import run_module
from training.checkpoint import load_checkpoint
from training.refit_heads import HeadVariant


def test_variant_parsing_and_errors():
    assert HeadVariant.parse("c2:head=conv2,kd=0.5,t=4") == HeadVariant("c2", "conv2", 0.5, 4.0)
    assert HeadVariant.parse("plain") == HeadVariant("plain")
    for bad, message in [("x:head=mlp", "unknown head"), ("x:kd=2", "kd must"), ("x:lr=1", "unknown option"),
                         ("x:kd=abc", "not a number"), (":kd=1", "plain name")]:
        with pytest.raises(UserError, match=message):
            HeadVariant.parse(bad)


def test_refit_changes_only_the_early_heads(tiny_checkpoint, imagefolder, tmp_path):
    out = tmp_path / "heads"
    result = run_module("training.refit_heads", "--checkpoint", str(tiny_checkpoint), "--data", str(imagefolder),
                        "--variant", "lin:head=linear,kd=0.5", "--variant", "conv:head=conv1",
                        "--epochs", "2", "--batch-size", "16", "--views", "2", "--output-dir", str(out),
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "epoch 2 conv: held-out acc" in result.stdout
    reference, _ = load_checkpoint(tiny_checkpoint)
    for name, head in [("lin", "linear"), ("conv", "conv1")]:
        model, meta = load_checkpoint(out / f"{name}.safetensors")
        assert meta.model_kwargs["early_head"] == head
        assert meta.training["head_refit"]["variant"]["name"] == name
        assert meta.epochs_completed == 2 and len(meta.heldout_acc) == 3
        # Trunk and final exit, batch-norm statistics included, bit for bit as loaded.
        for part in ("stem", "segments"):
            for (key, value), (_, original) in zip(getattr(model, part).state_dict().items(),
                                                   getattr(reference, part).state_dict().items()):
                assert torch.equal(value, original), key
        for key, value in model.heads[-1].state_dict().items():
            assert torch.equal(value, reference.heads[-1].state_dict()[key])
        assert (out / f"{name}.log.jsonl").read_text().count("\n") == 2
    lin, _ = load_checkpoint(out / "lin.safetensors")
    assert not torch.equal(lin.heads[0].fc.weight, reference.heads[0].fc.weight)


def test_refit_refuses_duplicate_names(tiny_checkpoint, tmp_path):
    result = run_module("training.refit_heads", "--checkpoint", str(tiny_checkpoint), "--variant", "a",
                        "--variant", "a", "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "names must differ" in result.stderr
