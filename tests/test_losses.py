import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from training.losses import MultiExitLoss, parse_exit_weights


def test_loss_is_weighted_sum_of_exit_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5) for _ in range(3)]
    targets = torch.tensor([0, 1, 2, 3])
    loss = MultiExitLoss((0.5, 1.0, 2.0))(logits, targets)
    expected = sum(w * F.cross_entropy(out, targets) for w, out in zip((0.5, 1.0, 2.0), logits))
    torch.testing.assert_close(loss, expected)


def test_distillation_adds_kl_from_final_exit_and_vanishes_when_exits_agree():
    torch.manual_seed(0)
    targets = torch.tensor([0, 1])
    final = torch.randn(2, 5)
    base = MultiExitLoss((1.0, 1.0))
    distilled = MultiExitLoss((1.0, 1.0), distill_weight=1.0, temperature=2.0)
    same = [final.clone(), final]
    torch.testing.assert_close(distilled(same, targets), base(same, targets))
    different = [torch.randn(2, 5), final]
    assert distilled(different, targets) > base(different, targets)


def test_distillation_sends_no_gradient_to_teacher():
    final = torch.randn(2, 5, requires_grad=True)
    early = torch.randn(2, 5, requires_grad=True)
    MultiExitLoss((0.0, 0.0), distill_weight=1.0)([early, final], torch.tensor([0, 1])).backward()
    assert early.grad.abs().sum() > 0
    assert final.grad is None or final.grad.abs().sum() == 0


def test_parse_exit_weights():
    assert parse_exit_weights(None, 3) == (1.0, 1.0, 1.0)
    assert parse_exit_weights("0.3", 2) == (0.3, 0.3)
    assert parse_exit_weights("1,2,3", 3) == (1.0, 2.0, 3.0)
    with pytest.raises(UserError, match="3 exits"):
        parse_exit_weights("1,2", 3)


def test_exit_distillation_is_cross_entropy_at_kd_zero_and_kl_at_kd_one():
    from training.losses import exit_distillation_loss

    torch.manual_seed(0)
    targets = torch.tensor([0, 1, 2])
    exits = [torch.randn(3, 4) for _ in range(2)]
    teacher = torch.randn(3, 4)
    plain = exit_distillation_loss(exits, teacher, targets, kd=0.0, temperature=3.0)
    torch.testing.assert_close(plain, sum(F.cross_entropy(e, targets) for e in exits))
    soft = exit_distillation_loss(exits, teacher, targets, kd=1.0, temperature=2.0)
    expected = sum(4 * F.kl_div(F.log_softmax(e / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
                   for e in exits)
    torch.testing.assert_close(soft, expected)
    # An exit that copies the teacher loses nothing to distillation.
    assert exit_distillation_loss([teacher.clone()], teacher, targets, kd=1.0, temperature=2.0).abs() < 1e-6


def test_exit_distillation_moves_the_exits_and_never_the_teacher():
    from training.losses import exit_distillation_loss

    teacher = torch.randn(2, 5, requires_grad=True)
    early = torch.randn(2, 5, requires_grad=True)
    exit_distillation_loss([early], teacher, torch.tensor([0, 1]), kd=0.5, temperature=3.0).backward()
    assert early.grad.abs().sum() > 0
    assert teacher.grad is None


def test_an_external_teacher_distils_every_exit_and_gets_no_gradient():
    torch.manual_seed(0)
    exits = [torch.randn(6, 10, requires_grad=True) for _ in range(3)]
    teacher = torch.randn(6, 10, requires_grad=True)
    targets = torch.randint(0, 10, (6,))
    plain = MultiExitLoss((1.0, 1.0, 1.0), temperature=2.0)
    taught = MultiExitLoss((1.0, 1.0, 1.0), temperature=2.0, teacher_weight=0.5)
    expected = plain(exits, targets) + sum(
        0.5 * 4.0 * F.kl_div(F.log_softmax(out / 2.0, dim=1), F.softmax(teacher / 2.0, dim=1), reduction="batchmean")
        for out in exits)
    loss = taught(exits, targets, teacher)
    assert torch.allclose(loss, expected)
    assert torch.allclose(taught(exits, targets), plain(exits, targets))  # no teacher logits: no term
    assert torch.allclose(plain(exits, targets, teacher), plain(exits, targets))  # weight 0: no term
    loss.backward()
    assert teacher.grad is None and all(out.grad is not None for out in exits)  # the final exit learns too
    # exits that already answer as the teacher does add nothing
    same = [teacher.detach().clone() for _ in range(3)]
    assert torch.allclose(taught(same, targets, teacher), plain(same, targets), atol=1e-6)
