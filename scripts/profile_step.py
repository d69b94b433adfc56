"""Where the time of one distilled training step of the student goes (docs/performance.md, "On one GPU").

Times, at one batch size in bf16 autocast and eager mode: the whole step (student forward and backward, the
teacher's forward, the hybrid loss, fused AdamW), the student's step alone and the teacher's forward alone; then
lists the kernels that took the most device time over a few steps (``torch.profiler``).

    python scripts/profile_step.py                      # CUDA, batch 1024
    python scripts/profile_step.py --device cpu -b 8    # a smoke test
"""
import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import titn_lib  # noqa: F401  (registers titn_* and aircnn_*)
from titn_lib import TITNDistillLoss


def timed_ms(fn, device: torch.device, steps: int) -> float:
    for _ in range(2):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('-b', '--batch-size', type=int, default=1024)
    p.add_argument('--steps', type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    model = timm.create_model('titn_tiny_patch8_32', num_classes=10, drop_path_rate=0.05).to(device)
    model.set_distilled_training(True)
    teacher = timm.create_model('aircnn_wide_32', num_classes=10).to(device, memory_format=torch.channels_last)
    teacher.requires_grad_(False).eval()
    with_teacher = TITNDistillLoss(teacher, alpha=0.5, distillation='hard')
    alone = TITNDistillLoss(None, alpha=0.5, distillation='hard')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({'fused': True} if device.type == 'cuda' else {}))
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    teacher_logits = torch.randn(args.batch_size, 10, device=device)

    def step(criterion=with_teacher, **teacher_kw):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = criterion(x, model(x), y, **teacher_kw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            teacher(x)

    whole = timed_ms(step, device, args.steps)
    student = timed_ms(lambda: step(alone, teacher_logits=teacher_logits), device, args.steps)
    teacher_ms = timed_ms(teacher_forward, device, args.steps)
    print(f'{device} batch {args.batch_size}, bf16 autocast, eager: whole step {whole:.1f} ms '
          f'({args.batch_size / whole * 1e3:.0f} img/s); student step alone {student:.1f} ms; '
          f'teacher forward {teacher_ms:.1f} ms')
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == '__main__':
    main()
