"""The two modules handed to DeepSpeed: the trained student (+ projectors) and the frozen teacher body.

Both return the LAST hidden state only (after the final norm), never all layers' hidden states and never
full-sequence logits: heads are applied later to the few rows the loss needs (a [B, S, V] logit tensor
would dominate memory).
Shape legend: ``B`` batch, ``S``/``T`` student/teacher positions, ``D``/``E`` student/teacher hidden.
"""

from __future__ import annotations

from torch import Tensor, nn

from dskd_scale.models.build import body_of, causal_lm_of, head_of


class DistillStudent(nn.Module):
    """Student LM plus the trainable projectors, so one engine (one optimizer) owns all of them.

    Attributes:
        student: the HF causal LM (possibly a peft LoRA model).
        t2s_projector: teacher -> student hidden map ``[E] -> [D]`` (DSKD criteria), else None.
        s2t_projector: learned student -> teacher map (``kd.s2t_map=learned``), else None.
        cma_projectors: the DSKD-CMA baseline's query/t2s/s2t projectors, else None.
    """

    def __init__(self, student: nn.Module, t2s_projector: nn.Module | None = None,
                 s2t_projector: nn.Module | None = None, cma_projectors: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.t2s_projector = t2s_projector
        self.s2t_projector = s2t_projector
        self.cma_projectors = cma_projectors

    @property
    def head(self) -> nn.Module:
        return head_of(self.student)

    @property
    def causal_lm(self) -> nn.Module:
        return causal_lm_of(self.student)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Student last hidden ``[B, S, D]``; the losses apply the projectors to the few aligned rows."""
        return body_of(self.student)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TeacherBody(nn.Module):
    """Frozen teacher; ``forward`` gives the last hidden state ``[B, T, E]`` (call it under no_grad)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    @property
    def head(self) -> nn.Module:
        return head_of(self.teacher)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return body_of(self.teacher)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
