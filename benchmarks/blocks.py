"""Where a TITN block's time goes: its parts against a timm DeiT/ViT block at the same outer size.

Prints one Markdown table: forward and forward+backward milliseconds (medians of interleaved repetitions),
MACs and the achieved GMAC/s of each part, at TITN-tiny's sizes (batch 128, 32x32, patch 8, pixel 2: the inner
parts see 128 * 16 sequences of 16 tokens of width 12, the outer parts 128 sequences of 18 tokens of width 192).

    python benchmarks/blocks.py                 # all cores
    python benchmarks/blocks.py --threads 1
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as VitBlock
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from titn_lib.layers import InnerBlock, OuterBlock


def parts(batch: int):
    """name -> (callable, inputs): TITN's inner block and its parts, its outer block, a ViT block."""
    inner = InnerBlock(12, 2)
    outer = OuterBlock(192, 3, num_pixel=16, inner_dim=12)
    vit = VitBlock(192, 3)
    pixels = torch.randn(batch * 16, 16, 12, requires_grad=True)
    patches = torch.randn(batch, 18, 192, requires_grad=True)
    q, k, v = (torch.randn(batch * 16, 2, 16, 6, requires_grad=True) for _ in range(3))
    return {
        'TITN InnerBlock (B*16, 16, 12)': (inner, (pixels,)),
        '  its attention core (SDPA, head dim 6)': (F.scaled_dot_product_attention, (q, k, v)),
        '  its LayerNorm (width 12)': (inner.norm1, (pixels,)),
        '  its MLP (12 -> 48 -> 12, GELU)': (inner.mlp, (pixels,)),
        'TITN OuterBlock + patch residual (B, 18, 192)': (outer, (patches, pixels)),
        'timm ViT/DeiT Block (B, 18, 192)': (vit, (patches,)),
    }


def time_ms(fn, inputs, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        fn(*inputs).sum().backward()
    else:
        with torch.no_grad():
            fn(*inputs)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--threads', type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = parts(args.batch)
    times = {name: {False: [], True: []} for name in table}
    for rep in range(args.reps + 2):  # two warm-up rounds, then interleaved repetitions
        for name, (fn, inputs) in table.items():
            for backward in (False, True):
                t = time_ms(fn, inputs, backward)
                if rep >= 2:
                    times[name][backward].append(t)
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}\n')
    print('| part | forward (ms) | forward + backward (ms) | forward GMACs | forward GMAC/s |')
    print('|---|---|---|---|---|')
    for name, (fn, inputs) in table.items():
        # counted through SDPA's math backend: the flop counter has no formula for the fused CPU kernel
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            fn(*(t.detach() for t in inputs))
        gmacs = counter.get_total_flops() / 2e9
        fwd, fwd_bwd = statistics.median(times[name][False]), statistics.median(times[name][True])
        print(f'| {name} | {fwd:.2f} | {fwd_bwd:.2f} | {gmacs:.4f} | {gmacs / fwd * 1e3:.1f} |')
    print('\nGMACs: torch.utils.flop_counter, with attention counted through its math backend (q k^T and attn v).')


if __name__ == '__main__':
    main()
