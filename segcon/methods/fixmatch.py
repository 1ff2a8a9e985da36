"""FixMatch (METHODS.md §0'): the student labels its own weak view."""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.methods.teacher_student import TeacherStudentModule
from segcon.models.output import SegOutput


class FixMatch(TeacherStudentModule):
    """The student labels its own weak view (train mode, no gradient, no train-only heads) and
    learns to predict those labels on the CutMixed strong view. The EMA teacher is kept for
    evaluation (and for terms that read it)."""

    @torch.no_grad()
    def weak_probs(self, weak: Tensor) -> tuple[Tensor, SegOutput | None]:
        """The student's class probabilities `[B, K, H, W]` of the weak views, and the teacher's
        output when a term reads it."""
        return self.net.forward_features(weak, heads=()).logits.softmax(1), self.teacher_output(weak)
