import re

import pytest
import torch

from common.errors import UserError
from training.attach import BACKBONE_ENTRIES
from training.models import create_model, list_models


@pytest.mark.parametrize("name", [name for name in list_models() if name not in BACKBONE_ENTRIES])
def test_every_entry_gives_logits_at_every_exit(name):  # backbone entries: tests/test_any_network.py
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(model.exits) >= 2
    for logits in outputs:
        assert logits.shape == (2, 7)
    depths = model.exit_depths
    assert depths == sorted(depths) and depths[-1] == int(re.match(r"[a-z]+(\d+)_", name).group(1))
    macs = [spec.macs for spec in model.exits]
    params = [spec.params for spec in model.exits]
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert all(a < b for a, b in zip(params, params[1:]))


@pytest.mark.parametrize("name", ["mwresnet8_3", "mwresnet20_3"])
def test_forward_until_matches_forward(name):
    model = create_model(name).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for index in range(len(model.exits)):
            logits, activations = model.forward_until(index, x)
            torch.testing.assert_close(logits, full[index])
            if index + 1 < len(model.exits):
                next_logits, _ = model.run_segment(index + 1, activations)
                torch.testing.assert_close(next_logits, full[index + 1])


def test_mwresnet56_5_matches_the_multiway_bp_paper():
    model = create_model("mwresnet56_5")
    assert model.exit_depths == [15, 25, 35, 45, 56]
    assert [spec.block for spec in model.exits] == [7, 12, 17, 22, 27]
    # Multi-way BP reports about 0.03, 0.09, 0.18, 0.48 and 0.85 M cumulative parameters.
    paper = [0.03, 0.09, 0.18, 0.48, 0.85]
    for spec, expected in zip(model.exits, paper):
        assert abs(spec.params / 1e6 - expected) < 0.01, (spec.depth, spec.params)
    # ResNet-56 on 32x32 costs about 125 M MACs.
    assert 120e6 < model.exits[-1].macs < 130e6


def test_unknown_model_lists_known_ones():
    with pytest.raises(UserError, match="mwresnet56_5"):
        create_model("resnet9000")


def test_unknown_exit_depth_lists_available_depths():
    model = create_model("mwresnet8_3")
    assert model.exit_index(5) == 1
    with pytest.raises(UserError, match="available depths: 3, 5, 8"):
        model.exit_index(4)


@pytest.mark.parametrize("scale", [0.0, 0.25, 1.0])
def test_head_grad_scale_scales_what_early_heads_send_into_the_trunk(scale):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads, outputs = {}, {}
    for s in (1.0, scale):
        model = create_model("mwresnet8_3", num_classes=5).train()
        torch.manual_seed(1)
        model.load_state_dict(create_model("mwresnet8_3", num_classes=5).state_dict())
        model.head_grad_scale = s
        logits = model(x)
        logits[0].sum().backward()  # only the first, early exit's loss
        grad = model.stem.weight.grad  # None when no gradient reaches the trunk
        grads[s] = torch.zeros_like(model.stem.weight) if grad is None else grad.clone()
        outputs[s] = [out.detach() for out in logits]
        assert model.heads[0].fc.weight.grad.abs().sum() > 0  # the head itself always learns
    for a, b in zip(outputs[1.0], outputs[scale]):
        torch.testing.assert_close(a, b)  # forward values do not change
    torch.testing.assert_close(grads[scale], grads[1.0] * scale)


@pytest.mark.parametrize("head", ["conv1", "conv2"])
def test_conv_heads_give_logits_and_their_macs_count_in_the_exits(head):
    plain = create_model("mwresnet56_5", early_head="linear")
    model = create_model("mwresnet56_5", early_head=head).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 10)] * 5
    for spec, base in zip(model.exits, plain.exits):
        assert spec.standalone_macs > base.standalone_macs or spec.index == 4
        assert spec.macs >= spec.standalone_macs  # the cascade also paid the earlier heads
    # The final exit alone is the plain network; through the cascade it pays every early head.
    assert model.exits[-1].standalone_macs == plain.exits[-1].standalone_macs
    early_heads = sum(s.standalone_macs - b.standalone_macs for s, b in zip(model.exits[:-1], plain.exits[:-1]))
    assert model.exits[-1].macs - plain.exits[-1].macs == early_heads
    # Two convolutions on ResNet-56 cost 2.4-4.7 MMAC per head: a few percent, not a second network.
    assert early_heads < 0.15 * plain.exits[-1].standalone_macs


def test_linear_heads_cost_next_to_nothing_through_the_cascade():
    model = create_model("mwresnet20_3")
    for spec in model.exits:  # only the earlier heads' FC layers: a few hundred MACs
        assert 0 <= spec.macs - spec.standalone_macs < 1e-4 * spec.standalone_macs


def test_unknown_head_is_a_user_error():
    with pytest.raises(UserError, match="unknown exit head"):
        create_model("mwresnet8_3", early_head="transformer")


def test_an_option_an_entry_does_not_take_is_a_user_error():
    with pytest.raises(UserError, match="takes no 'dropout' option"):
        create_model("mwresnet8_3", dropout=0.3)
