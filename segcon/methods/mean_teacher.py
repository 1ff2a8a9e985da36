"""Mean teacher (U²PL-style base, METHODS.md §0'): the EMA teacher labels the weak view."""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.methods.teacher_student import TeacherStudentModule
from segcon.models.output import SegOutput


class MeanTeacher(TeacherStudentModule):
    """The EMA teacher (eval mode) labels each unlabeled image's weak view; the student learns
    those labels on the CutMixed strong view."""

    @torch.no_grad()
    def weak_probs(self, weak: Tensor) -> tuple[Tensor, SegOutput | None]:
        """The teacher's class probabilities `[B, K, H, W]` of the weak views, and its whole output
        when a term reads it (one teacher pass either way)."""
        teacher = self.teacher_output(weak)
        logits = self.teacher(weak) if teacher is None else teacher.logits
        return logits.softmax(1), teacher
