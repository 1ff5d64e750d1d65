"""Online distillation (Xie et al., "Training convolutional neural networks with cheap
convolutions and online distillation"): K students of one architecture (typically a
cheap-convolution student, `--conv`) are trained together with a teacher formed online,
without pre-training, from their concatenated final features and a new linear classifier.
Teacher and students learn from each other (mutual KL at a temperature; see
`training.losses.online_distillation_loss`). Every student keeps its multi-way BP exits
and their losses. The checkpoint keeps one student, the best on the held-out split after
each epoch (the paper selects the best student on validation data), so the result is an
ordinary multi-exit network that exports and serves like any other.

    python -m training.train --model mwresnet56_5 --conv depthwise --online-distill 3

Defaults: temperature 3, both KL terms at weight 1. The seed README only gives its
script's flags (`--lambda 0.8 --miu 1`, for a teacher-to-student setting we do not
reproduce); the temperature and weights here are our reading of the paper, recorded in
each checkpoint's `training.online_distill`.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError
from training.checkpoint import save_resume_state
from training.losses import MultiExitLoss, online_distillation_loss
from training.models import MultiExitNet, create_model
from training.train import Trainer
from training.transforms import to_normalized

DEFAULT_TEMPERATURE = 3.0
DEFAULT_STUDENT_WEIGHT = 1.0  # KL(teacher || student) into each student
DEFAULT_TEACHER_WEIGHT = 1.0  # KL(student || teacher) into the teacher, averaged over students


class OnlineOutputs(list):
    """The first student's exit logits (a list, as a `MultiExitNet` returns), with every
    student's exit logits in `students` and the online teacher's logits in `teacher`."""

    def __init__(self, students: list[list[torch.Tensor]], teacher: torch.Tensor) -> None:
        super().__init__(students[0])
        self.students = students
        self.teacher = teacher


def final_classifier(model: MultiExitNet) -> nn.Linear:
    """The last linear layer of the final exit's head: its input is the student's feature vector."""
    linears = [module for module in model.heads[-1].modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError(f"{model.name}: the final head has no linear classifier for the online teacher to read")
    return linears[-1]


class OnlineTeacherGroup(nn.Module):
    """K students and the online teacher: a linear classifier on their concatenated final features."""

    def __init__(self, students: list[MultiExitNet]) -> None:
        super().__init__()
        if len(students) < 2:
            raise UserError("online distillation needs at least 2 students")
        self.students = nn.ModuleList(students)
        features = sum(final_classifier(student).in_features for student in students)
        self.teacher_head = nn.Linear(features, students[0].num_classes)

    def forward(self, x: torch.Tensor) -> OnlineOutputs:
        features: list[torch.Tensor] = []
        handles = [final_classifier(student).register_forward_hook(
            lambda module, inputs, output: features.append(inputs[0])) for student in self.students]
        try:
            logits = [student(x) for student in self.students]
        finally:
            for handle in handles:
                handle.remove()
        return OnlineOutputs(logits, self.teacher_head(torch.cat(features, dim=1)))


class OnlineDistillLoss:
    """`online_distillation_loss` over a group's `OnlineOutputs`."""

    def __init__(self, exit_loss: MultiExitLoss, temperature: float = DEFAULT_TEMPERATURE,
                 student_weight: float = DEFAULT_STUDENT_WEIGHT, teacher_weight: float = DEFAULT_TEACHER_WEIGHT):
        self.exit_loss, self.temperature = exit_loss, temperature
        self.student_weight, self.teacher_weight = student_weight, teacher_weight
        self.exit_weights = exit_loss.exit_weights  # what the trainer records

    def __call__(self, outputs: OnlineOutputs, targets: torch.Tensor) -> torch.Tensor:
        return online_distillation_loss(outputs.students, outputs.teacher, targets, self.exit_loss,
                                        self.temperature, self.student_weight, self.teacher_weight)

    def record(self) -> dict:
        return {"temperature": self.temperature, "student_weight": self.student_weight,
                "teacher_weight": self.teacher_weight}


def heldout_accuracy(group: OnlineTeacherGroup, images, labels, mean, std, device,
                     batch_size: int = 500) -> tuple[list[list[float]], float]:
    """Per student, the accuracy of every exit, and the teacher's accuracy, in one pass."""
    was_training = group.training
    group.eval()
    students = len(group.students)
    exits = len(group.students[0].exits)
    correct = torch.zeros(students, exits, dtype=torch.long)
    teacher_correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            batch = to_normalized(images[start:start + batch_size], mean, std).to(device)
            target = torch.as_tensor(labels[start:start + batch_size]).to(device)
            outputs = group(batch)
            for k, student in enumerate(outputs.students):
                for e, logits in enumerate(student):
                    correct[k, e] += int((logits.argmax(1) == target).sum())
            teacher_correct += int((outputs.teacher.argmax(1) == target).sum())
    group.train(was_training)
    total = max(1, len(labels))
    return (correct.double() / total).tolist(), teacher_correct / total


class OnlineDistillTrainer(Trainer):
    """The training loop with K students and an online teacher; `self.model` is the kept student."""

    def _build_model(self) -> None:
        config = self.config
        if config.online_distill < 2:
            raise UserError("--online-distill K needs K >= 2 students")
        for flag in ("freeze_trunk", "freeze_backbone", "init_from", "pretrained"):
            if getattr(config, flag, None):
                raise UserError(f"--online-distill trains its students from scratch: --{flag.replace('_', '-')} "
                                "does not combine with it")
        super()._build_model()
        if getattr(self, "cotrain", None) is not None:
            raise UserError("--online-distill does not combine with a co-trained _split model")
        students = [self.model]
        for k in range(1, config.online_distill):
            torch.manual_seed(config.seed + 1000 * k)  # each student its own initialisation
            student = create_model(config.model, num_classes=self.model.num_classes,
                                   input_size=tuple(self.model.input_size), **config.model_kwargs)
            student.head_grad_scale = config.head_grad_scale
            students.append(student)
        self.group = OnlineTeacherGroup(students).to(self.device)
        if self.channels_last:
            self.group.to(memory_format=torch.channels_last)
        self.kept_student = 0
        self.online_record: dict = {}
        self.loss = OnlineDistillLoss(self.loss, config.od_temperature, config.od_student_weight,
                                      config.od_teacher_weight)

    def _with_group_as_model(self, method) -> None:
        """Run a base-class step that works on `self.model` on the whole group instead."""
        kept, self.model = self.model, self.group
        try:
            method()
        finally:
            self.model = kept

    def _build_optimisation(self) -> None:
        self._with_group_as_model(super()._build_optimisation)

    def _prepare_steps(self) -> None:
        self._with_group_as_model(super()._prepare_steps)

    def _resume(self) -> None:
        self._with_group_as_model(super()._resume)
        if self.history:
            self.kept_student = self.history[-1].get("kept_student", 0)
            self.model = self.group.students[self.kept_student]

    def train_epoch(self, epoch: int) -> dict:
        self.group.train()
        stats = super().train_epoch(epoch)  # reports the first student's training accuracy
        students, teacher = heldout_accuracy(self.group, self.heldout_images, self.heldout_labels,
                                             self.mean, self.std, self.device)
        self.kept_student = max(range(len(students)), key=lambda k: students[k][-1])
        self.model = self.group.students[self.kept_student]
        self.online_record = {"students_heldout_acc": students, "teacher_heldout_acc": teacher}
        return {**stats, "kept_student": self.kept_student, "students_heldout_acc": students,
                "teacher_heldout_acc": teacher}

    def training_config(self) -> dict:
        config = super().training_config()
        config["online_distill"] = {
            "students": len(self.group.students), "kept_student": self.kept_student,
            "teacher": "linear classifier on the students' concatenated final features",
            **self.loss.record(), **self.online_record,
        }
        return config

    def _save(self, epochs_done: int, heldout_acc: list[float]) -> None:
        super()._save(epochs_done, heldout_acc)  # the kept student's checkpoint
        # The resume state holds the whole group (every student and the teacher head).
        save_resume_state(self.resume_file, {
            "model_name": self.config.model, "model": self.group.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epochs_done, "history": self.history, "init_from": self.init_meta,
        })
