"""TITNDistillLoss (paper §3.5, Eq. 9-10): hand-computed values, Mixup targets, teacher handling, errors."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup

from titn_lib import TITNDistillLoss

CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
DIST = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
TEACHER = torch.tensor([[0.1, 3.0, 0.2], [0.0, 0.5, 1.0]])  # argmax 1, 2
TARGETS = torch.tensor([0, 1])
INPUTS = torch.zeros(2, 3, 4, 4)


def ce(logits, label):
    """-log softmax(logits)[label], by hand."""
    values = logits.tolist()
    return -(values[int(label)] - math.log(sum(math.exp(v) for v in values)))


def softmax(v, t=1.0):
    e = [math.exp(x / t) for x in v.tolist()]
    return [x / sum(e) for x in e]


def test_hard_distillation_by_hand():
    loss = TITNDistillLoss(alpha=0.5, distillation='hard')
    value = loss(INPUTS, (CLS, DIST), TARGETS, teacher_logits=TEACHER)
    base = (ce(CLS[0], 0) + ce(CLS[1], 1)) / 2
    distill = (ce(DIST[0], 1) + ce(DIST[1], 2)) / 2
    assert value.item() == pytest.approx(0.5 * base + 0.5 * distill, rel=1e-6)
    assert loss.last_parts['base'].item() == pytest.approx(base, rel=1e-6)
    assert loss.last_parts['distill'].item() == pytest.approx(distill, rel=1e-6)
    value = TITNDistillLoss(alpha=0.25)(INPUTS, (CLS, DIST), TARGETS, teacher_logits=TEACHER)
    assert value.item() == pytest.approx(0.75 * base + 0.25 * distill, rel=1e-6)


@pytest.mark.parametrize('reduction', ['batchmean', 'deit'])
def test_soft_distillation_by_hand(reduction):
    tau = 2.0
    loss = TITNDistillLoss(alpha=1.0, distillation='soft', tau=tau, soft_reduction=reduction)
    value = loss(INPUTS, (CLS, DIST), TARGETS, teacher_logits=TEACHER)
    kl_sum = 0.0
    for s, t in zip(DIST, TEACHER):
        p_t, p_s = softmax(t, tau), softmax(s, tau)
        kl_sum += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    denom = 2 if reduction == 'batchmean' else DIST.numel()
    assert value.item() == pytest.approx(kl_sum * tau ** 2 / denom, rel=1e-5)


def test_none_and_label_smoothing_by_hand():
    loss = TITNDistillLoss(distillation='none', label_smoothing=0.1)
    value = loss(INPUTS, CLS, TARGETS)  # a plain tensor is fine without distillation
    expected = 0.0
    for logits, label in zip(CLS, TARGETS):
        logp = [math.log(p) for p in softmax(logits)]
        expected += -(0.9 * logp[int(label)] + 0.1 * sum(logp) / 3)
    assert value.item() == pytest.approx(expected / 2, rel=1e-6)
    assert set(loss.last_parts) == {'base', 'total'}
    # with a (cls, dist) tuple, 'none' trains the class token only
    assert loss(INPUTS, (CLS, DIST), TARGETS).item() == pytest.approx(expected / 2, rel=1e-6)


def test_cutmix_targets_equal_lambda_weighted_cross_entropy():
    """Eq. 9: soft-target CE on timm's CutMix targets = lam * CE(y_a) + (1 - lam) * CE(y_b)."""
    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0., cutmix_alpha=0.5, label_smoothing=0.0, num_classes=3)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    mixed_images, soft_targets = mixup(images.clone(), labels)
    logits = torch.randn(4, 3)
    loss = TITNDistillLoss(distillation='none')(mixed_images, logits, soft_targets)
    # timm mixes each sample with the batch flipped; recover lambda from the targets
    lam = 1 - soft_targets[0, labels.flip(0)[0]].item()
    by_eq9 = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels.flip(0))
    assert loss.item() == pytest.approx(by_eq9.item(), rel=1e-5)
    assert 0 < lam < 1


class RecordingTeacher(nn.Module):
    """A teacher with batch-norm, which records the inputs it receives."""

    def __init__(self, num_classes=3, in_chans=3):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chans)
        self.fc = nn.Linear(in_chans, num_classes)
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        return self.fc(self.bn(x).mean((2, 3)))


def test_teacher_is_frozen_and_in_eval_mode():
    teacher = RecordingTeacher().train()
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    loss_fn = TITNDistillLoss(teacher)
    loss_fn.train()  # even if a caller switches the loss (and its teacher) to train mode
    stats = teacher.bn.running_mean.clone()
    x = torch.randn(4, 3, 4, 4)
    out = student(x)
    loss = loss_fn(x, (out[:, :3], out[:, 3:]), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert not teacher.training
    assert torch.equal(teacher.bn.running_mean, stats)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert torch.equal(teacher.seen, x)  # the same (possibly mixed) images the student saw


def test_teacher_renormalisation_and_resize():
    teacher = RecordingTeacher()
    loss_fn = TITNDistillLoss(teacher, student_mean=(0.5, 0.5, 0.5), student_std=(0.25, 0.25, 0.25),
                              teacher_mean=(0.0, 0.0, 0.0), teacher_std=(1.0, 1.0, 1.0), teacher_input_size=(8, 8))
    raw = torch.rand(2, 3, 4, 4)
    student_input = (raw - 0.5) / 0.25
    loss_fn(student_input, (torch.randn(2, 3), torch.randn(2, 3)), torch.tensor([0, 1]))
    torch.testing.assert_close(teacher.seen, F.interpolate(raw, size=(8, 8), mode='bilinear', align_corners=False))


def test_cached_teacher_logits_equal_teacher_module():
    teacher = RecordingTeacher().eval()
    x = torch.randn(2, 3, 4, 4)
    outputs = (torch.randn(2, 3), torch.randn(2, 3))
    with_module = TITNDistillLoss(teacher)(x, outputs, TARGETS)
    with_cache = TITNDistillLoss()(x, outputs, TARGETS, teacher_logits=teacher(x).detach())
    torch.testing.assert_close(with_module, with_cache)


@pytest.mark.parametrize('outputs,targets,teacher_logits,match', [
    (CLS, TARGETS, TEACHER, 'set_distilled_training'),
    ((CLS, DIST), TARGETS, torch.randn(2, 5), 'same classes'),
    ((CLS, DIST), torch.tensor([0, 1, 2]), TEACHER, 'labels for a batch of 2'),
    ((CLS, DIST), torch.zeros(2, 4), TEACHER, 'per-class probabilities'),
    ((CLS, DIST), torch.tensor([0, 3]), TEACHER, 'out of range'),
    ((CLS, DIST), torch.tensor([-1, 0]), TEACHER, 'out of range'),
])
def test_errors(outputs, targets, teacher_logits, match):
    with pytest.raises(ValueError, match=match):
        TITNDistillLoss()(INPUTS, outputs, targets, teacher_logits=teacher_logits)


def test_constructor_errors():
    with pytest.raises(ValueError, match='distillation must be one of'):
        TITNDistillLoss(distillation='medium')
    with pytest.raises(ValueError, match='all four'):
        TITNDistillLoss(student_mean=(0.5,))
    with pytest.raises(ValueError, match='without a teacher'):
        TITNDistillLoss()(INPUTS, (CLS, DIST), TARGETS)


@pytest.mark.parametrize('student_name,kwargs', [
    ('deit_tiny_distilled_patch16_224', dict(img_size=32, patch_size=8, depth=2)),
    ('titn_tiny_patch8_32', dict(depth=2)),
])
def test_three_step_training_loop(student_name, kwargs):
    torch.manual_seed(0)
    student = timm.create_model(student_name, num_classes=10, **kwargs)
    student.set_distilled_training(True)
    student.train()
    teacher = timm.create_model('aircnn_small_32', num_classes=10, in_chans=3)
    criterion = TITNDistillLoss(teacher, alpha=0.5, distillation='hard')
    mixup = Mixup(cutmix_alpha=0.5, num_classes=10)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = []
    for _ in range(3):
        x, y = mixup(images.clone(), labels.clone())
        outputs = student(x)
        loss = criterion(x, outputs, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():  # the last step's distillation term, by hand: CE against the teacher's argmax
        expected = F.cross_entropy(outputs[1], teacher.eval()(x).argmax(1))
    assert criterion.last_parts['distill'].item() == pytest.approx(expected.item(), rel=1e-5)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_injected_base_criterion_as_deit():
    """DeiT's contract: base_criterion(cls_logits, targets) replaces the built-in base term."""
    seen = []

    def base(logits, targets):
        seen.append((logits, targets))
        return logits.sum() * 0 + 7.0

    loss = TITNDistillLoss(alpha=0.25, base_criterion=base)
    value = loss(INPUTS, (CLS, DIST), TARGETS, teacher_logits=TEACHER)
    expected = 0.75 * 7.0 + 0.25 * (ce(DIST[0], 1) + ce(DIST[1], 2)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(seen[0][0], CLS) and torch.equal(seen[0][1], TARGETS)
    with pytest.raises(ValueError, match='set the smoothing on it'):
        TITNDistillLoss(base_criterion=base, label_smoothing=0.1)


@pytest.mark.parametrize('kwargs,match', [(dict(tau=float('nan')), 'tau'), (dict(tau=0.0), 'tau'),
                                          (dict(alpha=float('nan')), 'alpha'),
                                          (dict(label_smoothing=-0.1), 'label_smoothing'),
                                          (dict(label_smoothing=1.0), 'label_smoothing')])
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TITNDistillLoss(**kwargs)


def test_integer_and_boolean_targets():
    reference = TITNDistillLoss()(INPUTS, (CLS, DIST), TARGETS, teacher_logits=TEACHER)
    for dtype in (torch.int32, torch.uint8, torch.int16):
        value = TITNDistillLoss()(INPUTS, (CLS, DIST), TARGETS.to(dtype), teacher_logits=TEACHER)
        assert value.item() == pytest.approx(reference.item())
    with pytest.raises(ValueError, match='booleans'):
        TITNDistillLoss()(INPUTS, (CLS, DIST), TARGETS.bool(), teacher_logits=TEACHER)


def test_teacher_of_another_dtype_is_fed_its_dtype():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(torch.bfloat16)
    loss = TITNDistillLoss(teacher)
    x = torch.randn(2, 3, 4, 4)
    logits = loss.predict_teacher(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, teacher(x.bfloat16()).float())
    assert torch.isfinite(loss(x, (CLS, DIST), TARGETS))
