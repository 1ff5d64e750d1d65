"""Multi-way back-propagation loss: weighted cross-entropy over every exit,
optionally plus self-distillation of the early exits from the final one, and
distillation of every exit from an external teacher's logits (`training.train --teacher`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MultiExitLoss:
    exit_weights: tuple[float, ...]
    distill_weight: float = 0.0  # 0 disables self-distillation
    temperature: float = 3.0
    teacher_weight: float = 0.0  # distillation of every exit from an external teacher's logits (when given)

    def __call__(self, logits: list[torch.Tensor], targets: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if len(logits) != len(self.exit_weights):
            raise ValueError(f"{len(logits)} exits but {len(self.exit_weights)} weights")
        loss = sum(w * F.cross_entropy(out, targets) for w, out in zip(self.exit_weights, logits))
        if teacher_logits is not None and self.teacher_weight > 0:
            # Every exit, the final one included, from another (trained, frozen) network's answer.
            t = self.temperature
            teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
            for out in logits:
                loss = loss + self.teacher_weight * t * t * F.kl_div(
                    F.log_softmax(out.float() / t, dim=1), teacher, reduction="batchmean")
        if self.distill_weight > 0 and len(logits) > 1:
            # KL(teacher || student) with temperature, scaled by T^2 (Hinton et al.);
            # the final exit is the teacher and gets no gradient from it.
            t = self.temperature
            teacher = F.softmax(logits[-1].detach() / t, dim=1)
            for out in logits[:-1]:
                student = F.log_softmax(out / t, dim=1)
                loss = loss + self.distill_weight * t * t * F.kl_div(
                    student, teacher, reduction="batchmean"
                )
        return loss


def parse_exit_weights(text: str | None, num_exits: int) -> tuple[float, ...]:
    """"1" or "0.5,0.5,1" -> one weight per exit (a single value is broadcast)."""
    if not text:
        return (1.0,) * num_exits
    values = tuple(float(v) for v in text.split(","))
    if len(values) == 1:
        return values * num_exits
    if len(values) != num_exits:
        from common.errors import UserError

        raise UserError(f"--exit-weights has {len(values)} values, the model has {num_exits} exits")
    return values


def exit_distillation_loss(exit_logits: list[torch.Tensor], teacher_logits: torch.Tensor, targets: torch.Tensor,
                           kd: float, temperature: float) -> torch.Tensor:
    """Sum over early exits of (1 - kd) * cross-entropy + kd * T^2 * KL(teacher || exit) at temperature T.

    The teacher (the final exit's logits) is detached: distillation never moves it.
    `kd` = 0 is plain cross-entropy; the T^2 factor keeps the soft term's gradient
    on the scale of the hard one (Hinton et al., 2015), and the (1 - kd) weighting
    keeps the sum at one, unlike `MultiExitLoss`'s additive term.
    """
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1) if kd > 0 else None
    loss = exit_logits[0].new_zeros(())
    for logits in exit_logits:
        if kd < 1:
            loss = loss + (1 - kd) * F.cross_entropy(logits, targets)
        if teacher is not None:
            student = F.log_softmax(logits / temperature, dim=1)
            loss = loss + kd * temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean")
    return loss


def online_distillation_loss(student_logits: list[list[torch.Tensor]], teacher_logits: torch.Tensor,
                             targets: torch.Tensor, exit_loss: MultiExitLoss, temperature: float,
                             student_weight: float, teacher_weight: float) -> torch.Tensor:
    """Online distillation with mutual learning (training/online_distill.py): every student's
    multi-exit loss, the online teacher's cross-entropy, and at temperature T

    + student_weight x T^2 x KL(teacher || student's final exit), for each student (teacher detached)
    + teacher_weight x T^2 x mean over students of KL(student's final exit || teacher) (students detached).

    The teacher's logits come from the students' concatenated features, so its cross-entropy
    and its KL term also reach the students' trunks through those features.
    """
    t = temperature
    loss = sum(exit_loss(exits, targets) for exits in student_logits) + F.cross_entropy(teacher_logits, targets)
    soft_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=1)
    for exits in student_logits:
        final = exits[-1]
        if student_weight:
            loss = loss + student_weight * t * t * F.kl_div(F.log_softmax(final / t, dim=1), soft_teacher,
                                                            reduction="batchmean")
        if teacher_weight:
            soft_student = F.softmax(final.detach() / t, dim=1)
            loss = loss + teacher_weight / len(student_logits) * t * t * F.kl_div(log_teacher, soft_student,
                                                                                  reduction="batchmean")
    return loss
