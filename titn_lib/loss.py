"""The paper's hybrid loss (§3.5, Eq. 9-10): CutMix cross-entropy on the class token plus distillation on
the distillation token. Standalone: it depends on torch only and works with any ``(cls, dist)`` student."""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['TITNDistillLoss']

_DISTILLATION_MODES = ('hard', 'soft', 'none')
_SOFT_REDUCTIONS = ('batchmean', 'deit')


def _as_channel_tensor(values: Optional[Sequence[float]], name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.ndim != 1:
        raise ValueError(f'{name} must be a sequence of per-channel values, got shape {tuple(t.shape)}')
    return t.view(1, -1, 1, 1)


class TITNDistillLoss(nn.Module):
    """``(1 - alpha) * base(cls_logits, targets) + alpha * distill(dist_logits, teacher(inputs))`` (Eq. 10).

    Args:
        teacher: any ``nn.Module`` returning logits, run in eval mode under ``torch.no_grad()`` on the same
            (mixed) inputs the student saw. ``None`` if teacher logits are passed to ``forward``.
        alpha: weight of the distillation term; DeiT's ``alpha`` with the same meaning (0.5 in the paper).
        distillation: ``'hard'`` (the paper: cross-entropy against the teacher's argmax), ``'soft'``
            (KL divergence at temperature ``tau``, times ``tau**2``) or ``'none'`` (the base loss alone).
        tau: temperature of soft distillation.
        label_smoothing: smoothing of the base cross-entropy for integer targets (mixed targets from timm's
            ``Mixup`` already carry their own smoothing).
        base_criterion: DeiT's ``base_criterion(cls_logits, targets)``, replacing the built-in base term
            (cross-entropy for class indices, soft-target cross-entropy for mixed targets).
        soft_reduction: ``'batchmean'`` (KL summed over classes, averaged over the batch) or ``'deit'``
            (DeiT's ``reduction='sum'`` divided by the number of elements, ``batch * classes``).
        student_mean, student_std, teacher_mean, teacher_std: when all four are given, inputs normalised
            for the student are re-normalised for the teacher.
        teacher_input_size: ``(H, W)`` the teacher expects; inputs are resized (bilinear) when they differ.

    After each call, ``last_parts`` holds the detached ``base``, ``distill`` and ``total`` terms for logging.
    A teacher on another device or dtype than the inputs gets them moved and cast; its logits come back as float32
    on the inputs' device.
    """

    def __init__(
            self,
            teacher: Optional[nn.Module] = None,
            alpha: float = 0.5,
            distillation: str = 'hard',
            tau: float = 1.0,
            label_smoothing: float = 0.0,
            soft_reduction: str = 'batchmean',
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            teacher_mean: Optional[Sequence[float]] = None,
            teacher_std: Optional[Sequence[float]] = None,
            teacher_input_size: Optional[Tuple[int, int]] = None,
            base_criterion: Optional[nn.Module] = None,
    ):
        super().__init__()
        if distillation not in _DISTILLATION_MODES:
            raise ValueError(f'distillation must be one of {_DISTILLATION_MODES}, got {distillation!r}')
        if soft_reduction not in _SOFT_REDUCTIONS:
            raise ValueError(f'soft_reduction must be one of {_SOFT_REDUCTIONS}, got {soft_reduction!r}')
        if not 0.0 <= alpha <= 1.0:  # also refuses nan
            raise ValueError(f'alpha weighs the distillation term and must lie in [0, 1], got {alpha}')
        if not 0 < tau < float('inf'):
            raise ValueError(f'tau must be a positive, finite temperature, got {tau}')
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'label_smoothing must lie in [0, 1), got {label_smoothing}')
        if base_criterion is not None and label_smoothing:
            raise ValueError('label_smoothing configures the built-in base term: with a base_criterion, set the '
                             'smoothing on it instead')
        stats = (student_mean, student_std, teacher_mean, teacher_std)
        if any(s is not None for s in stats) and not all(s is not None for s in stats):
            raise ValueError('re-normalisation needs all four of student_mean, student_std, teacher_mean and '
                             'teacher_std; pass all of them or none')
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
        self.alpha = alpha
        self.distillation = distillation
        self.tau = tau
        self.label_smoothing = label_smoothing
        self.base_criterion = base_criterion
        self.soft_reduction = soft_reduction
        self.teacher_input_size = tuple(teacher_input_size) if teacher_input_size is not None else None
        for name, values in zip(('student_mean', 'student_std', 'teacher_mean', 'teacher_std'), stats):
            self.register_buffer(name, _as_channel_tensor(values, name), persistent=False)
        self.last_parts: Dict[str, torch.Tensor] = {}

    def teacher_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The student's inputs as the teacher expects them (re-normalised, resized)."""
        x = inputs
        if self.student_mean is not None:
            x = (x * self.student_std + self.student_mean - self.teacher_mean) / self.teacher_std
        if self.teacher_input_size is not None and tuple(x.shape[-2:]) != self.teacher_input_size:
            x = F.interpolate(x, size=self.teacher_input_size, mode='bilinear', align_corners=False)
        return x

    @torch.no_grad()
    def predict_teacher(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits for the student's ``inputs``."""
        if self.teacher is None:
            raise ValueError('this loss was built without a teacher: pass teacher_logits= to the call, or build '
                             'TITNDistillLoss(teacher=...)')
        if self.teacher.training:  # the teacher's batch-norm statistics must never change
            self.teacher.eval()
        x = self.teacher_inputs(inputs)
        param = next(self.teacher.parameters(), None)
        if param is not None and (param.device != x.device or (param.is_floating_point() and param.dtype != x.dtype)):
            x = x.to(param.device, param.dtype if param.is_floating_point() else x.dtype)
        return self.teacher(x).float().to(inputs.device)

    def base_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for integer targets; soft-target cross-entropy for mixed targets (Eq. 9)."""
        if self.base_criterion is not None:
            return self.base_criterion(logits, targets)
        batch, num_classes = logits.shape
        if targets.dtype == torch.bool:
            raise ValueError('targets are booleans: pass class indices (integers, shape (batch,)) or per-class '
                             'probabilities (float, shape (batch, classes))')
        if targets.ndim == 1 and not targets.is_floating_point():
            targets = targets.long()
            if targets.shape[0] != batch:
                raise ValueError(f'targets hold {targets.shape[0]} labels for a batch of {batch}')
            # checked where it costs nothing; on an accelerator the check would wait for the device at every step
            if targets.device.type == 'cpu' and targets.numel() and (
                    int(targets.min()) < 0 or int(targets.max()) >= num_classes):
                raise ValueError(f'class index out of range: targets span [{int(targets.min())}, '
                                 f'{int(targets.max())}] but the student predicts {num_classes} classes')
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if targets.shape != logits.shape:
            raise ValueError(f'targets must be class indices of shape ({batch},) or per-class probabilities of '
                             f'shape ({batch}, {num_classes}) as timm Mixup gives, got {tuple(targets.shape)} '
                             f'({targets.dtype})')
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def distill_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(f'teacher logits have shape {tuple(teacher_logits.shape)} but the student\'s '
                             f'distillation logits {tuple(dist_logits.shape)}: teacher and student must predict '
                             f'the same classes for the same batch')
        if self.distillation == 'hard':
            return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        T = self.tau
        kl = F.kl_div(F.log_softmax(dist_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                      reduction='sum', log_target=True)
        denom = dist_logits.numel() if self.soft_reduction == 'deit' else dist_logits.shape[0]
        return kl * (T * T) / denom

    def forward(
            self,
            inputs: torch.Tensor,
            outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
            targets: torch.Tensor,
            teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``criterion(inputs, outputs, targets)`` as DeiT's ``DistillationLoss``; ``outputs = (cls, dist)``."""
        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 2:
                raise ValueError(f'outputs must be (cls_logits, dist_logits), got a sequence of {len(outputs)}')
            cls_logits, dist_logits = outputs
        elif self.distillation == 'none':
            cls_logits, dist_logits = outputs, None
        else:
            raise ValueError('distillation needs the student to return (cls_logits, dist_logits) but it returned '
                             'one tensor: call model.set_distilled_training(True) and keep the model in train '
                             "mode, or use distillation='none'")
        base = self.base_loss(cls_logits, targets)
        if self.distillation == 'none':
            self.last_parts = {'base': base.detach(), 'total': base.detach()}
            return base
        if teacher_logits is None:
            teacher_logits = self.predict_teacher(inputs)
        distill = self.distill_loss(dist_logits, teacher_logits.detach())
        loss = (1 - self.alpha) * base + self.alpha * distill
        self.last_parts = {'base': base.detach(), 'distill': distill.detach(), 'total': loss.detach()}
        return loss
