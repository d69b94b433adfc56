"""Throughput, memory and cost of TITN against timm's TNT, DeiT-tiny-distilled and ViT-tiny at the same sizes.

Prints two Markdown tables from one run:
1. per model, batch size and mode (eager / torch.compile): inference and training-step images/s (forward,
   backward, SGD step), training memory, GMACs per image and parameters;
2. how the cost grows with the input size (32, 64, 128, 224 at patch 8 / pixel 2).
Models are interleaved within every repetition and the median is reported, since shared machines are noisy.

Training memory on CPU is measured exactly, not sampled: the bytes of the tensors autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once) plus parameters, gradients and momentum;
on CUDA it is ``torch.cuda.max_memory_allocated`` of a training step.

    python benchmarks/throughput.py                       # CPU: eager and compile, batch 1/32/128/256
    python benchmarks/throughput.py --batch-sizes 128 --no-compile --reps 7
"""
import argparse
import math
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F

import titn_lib  # noqa: F401  (registers titn_*)
from titn_lib.evaluate import count_params, gmacs_per_image


def model_zoo(img_size: int = 32, patch: int = 8, pixel: int = 2) -> Dict[str, Callable[[], torch.nn.Module]]:
    """Same outer size for all: dim 192, depth 12, heads 3, patch 8 at 32x32 (paper Table 1)."""
    return {
        'TITN (titn_tiny_patch8_32)': lambda: timm.create_model(
            'titn_tiny_patch8_32', img_size=img_size, patch_size=patch, pixel_size=pixel, num_classes=10),
        "timm TNT (same dims)": lambda: timm.create_model(
            'tnt_s_patch16_224', img_size=img_size, patch_size=patch, embed_dim=192, inner_dim=12, depth=12,
            num_heads_outer=3, num_heads_inner=2, first_stride=pixel, num_classes=10),
        'timm DeiT-tiny-distilled': lambda: timm.create_model(
            'deit_tiny_distilled_patch16_224', img_size=img_size, patch_size=patch, num_classes=10),
        'timm ViT-tiny': lambda: timm.create_model(
            'vit_tiny_patch16_224', img_size=img_size, patch_size=patch, num_classes=10),
    }


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _loss(out) -> torch.Tensor:
    targets = torch.zeros(out[0].shape[0] if isinstance(out, tuple) else out.shape[0], dtype=torch.long,
                          device=(out[0] if isinstance(out, tuple) else out).device)
    if isinstance(out, tuple):
        return F.cross_entropy(out[0], targets) + F.cross_entropy(out[1], targets)
    return F.cross_entropy(out, targets)


class Runner:
    """One model in one mode on one device: timed inference and training steps."""

    def __init__(self, make: Callable, device: torch.device, compiled: bool, amp: bool):
        self.device, self.amp = device, amp
        self.model = make().to(device)
        if hasattr(self.model, 'set_distilled_training'):
            self.model.set_distilled_training(True)  # as in distillation training: both heads are used
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.train_fn = torch.compile(self.model) if compiled else self.model
        self.infer_fn = self.train_fn

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def infer(self, x: torch.Tensor) -> float:
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            _sync(self.device)
            start = time.perf_counter()
            self.infer_fn(x)
            _sync(self.device)
        return time.perf_counter() - start

    def train_step(self, x: torch.Tensor) -> float:
        self.model.train()
        _sync(self.device)
        start = time.perf_counter()
        with self._autocast():
            loss = _loss(self.train_fn(x))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


def training_memory_mb(make: Callable, x: torch.Tensor) -> float:
    """Parameters + gradients + SGD momentum + the activations saved for backward, in MB: exact on CPU; on CUDA the
    peak allocated over two steps, less what was allocated before the model was built (other models, the input)."""
    base = torch.cuda.memory_allocated(x.device) if x.device.type == 'cuda' else 0
    model = make().to(x.device).train()
    if hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    if x.device.type == 'cuda':
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        for _ in range(2):
            torch.cuda.reset_peak_memory_stats(x.device)
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = _loss(model(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
    seen, saved = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model(x))
    del loss
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return (saved[0] + 3 * param_bytes) / 2**20


def bench(args) -> List[Dict]:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    amp = device.type == 'cuda'
    zoo = model_zoo()
    modes = ['eager'] + ([] if args.no_compile else ['compile'])
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 32, 32, device=device)
        for mode in modes:
            if mode == 'compile':
                torch._dynamo.reset()  # fresh caches: ViT and DeiT share frames, which would hit the recompile limit
            runners = {name: Runner(make, device, mode == 'compile', amp) for name, make in zoo.items()}
            for runner in runners.values():  # warm-up (and compilation)
                for _ in range(args.warmup):
                    runner.infer(x)
                    runner.train_step(x)
            times = {name: {'infer': [], 'train': []} for name in zoo}
            for _ in range(args.reps):  # interleaved
                for name, runner in runners.items():
                    times[name]['infer'].append(runner.infer(x))
                    times[name]['train'].append(runner.train_step(x))
            for name, runner in runners.items():
                rows.append(dict(
                    model=name, batch=batch, mode=mode, device=str(device) + (' bf16' if amp else ''),
                    infer=batch / statistics.median(times[name]['infer']),
                    train=batch / statistics.median(times[name]['train']),
                    memory=training_memory_mb(zoo[name], x) if mode == 'eager' else float('nan'),
                    gmacs=gmacs_per_image(runner.model, (3, 32, 32)),
                    params=count_params(runner.model) / 1e6))
            del runners
    return rows


def scaling(args) -> List[Dict]:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    rows = []
    for img in args.scaling_sizes:
        x = torch.randn(args.scaling_batch, 3, img, img, device=device)
        zoo = model_zoo(img_size=img)
        for name in ('TITN (titn_tiny_patch8_32)', 'timm DeiT-tiny-distilled'):
            runner = Runner(zoo[name], device, False, device.type == 'cuda')
            runner.infer(x)
            runner.train_step(x)
            infer = statistics.median(runner.infer(x) for _ in range(args.scaling_reps))
            train = statistics.median(runner.train_step(x) for _ in range(args.scaling_reps))
            rows.append(dict(model=name, img=img, tokens=(img // 8) ** 2,
                             gmacs=gmacs_per_image(runner.model, (3, img, img)),
                             infer=args.scaling_batch / infer, train=args.scaling_batch / train,
                             memory=training_memory_mb(zoo[name], x)))
    return rows


def print_tables(rows: List[Dict], scale_rows: List[Dict]) -> None:
    print('| model | batch | mode | device | infer img/s | train img/s | train memory (MB) | GMACs/img | params (M) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        memory = '-' if math.isnan(r['memory']) else f"{r['memory']:.0f}"  # measured in eager mode only
        print(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['device']} | {r['infer']:.0f} | {r['train']:.0f} | "
              f"{memory} | {r['gmacs']:.4f} | {r['params']:.2f} |")
    for batch in sorted({r['batch'] for r in rows}):
        for mode in sorted({r['mode'] for r in rows}):
            sel = {r['model']: r for r in rows if r['batch'] == batch and r['mode'] == mode}
            titn, tnt, deit = (sel.get(k) for k in ('TITN (titn_tiny_patch8_32)', 'timm TNT (same dims)',
                                                    'timm DeiT-tiny-distilled'))
            if titn and tnt and deit:
                memory = '' if mode != 'eager' else f"; memory TITN/TNT {titn['memory'] / tnt['memory']:.2f}x"
                print(f"\nbatch {batch}, {mode}: TITN/TNT train {titn['train'] / tnt['train']:.2f}x, infer "
                      f"{titn['infer'] / tnt['infer']:.2f}x; TITN/DeiT train {titn['train'] / deit['train']:.2f}x, "
                      f"infer {titn['infer'] / deit['infer']:.2f}x{memory}")
    if scale_rows:
        print('\n| model | input | patches | GMACs/img | infer img/s | train img/s | train memory (MB) |')
        print('|---|---|---|---|---|---|---|')
        for r in scale_rows:
            print(f"| {r['model']} | {r['img']} | {r['tokens']} | {r['gmacs']:.3f} | {r['infer']:.1f} | "
                  f"{r['train']:.1f} | {r['memory']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32, 128, 256])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--scaling-sizes', type=int, nargs='*', default=[32, 64, 128, 224])
    p.add_argument('--scaling-batch', type=int, default=8)
    p.add_argument('--scaling-reps', type=int, default=3)
    p.add_argument('--device', default='')
    p.add_argument('--threads', type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}\n')
    print_tables(bench(args), scaling(args) if args.scaling_sizes else [])


if __name__ == '__main__':
    main()
