"""Fine-tune pretrained TITN weights on another task, and compare with training from scratch.

The pretrained model is rebuilt for the new task while loading: a new class count (both heads reset), another
channel count (timm adapts ``pixel_embed.proj``) and another image size (``patch_pos`` resampled by
``checkpoint_filter_fn``). Both runs then take the same number of steps on the same images.

    python examples/finetune.py --weights titn_tiny_patch8_32.cifar10 --dataset mnist --num-images 5000 \
        --classes 5 --img-size 48 --steps 150
    # weights: a registered tag (downloaded from the Hub), or local-dir:weights/<arch>.<tag>
"""
import argparse
import json
import os
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import titn_lib  # noqa: F401
from titn_lib.data import DATASETS, build_dataset, build_transforms
from titn_lib.evaluate import evaluate


def first_classes(dataset, num_classes: int, limit: int):
    """The first ``limit`` images whose label is below ``num_classes``."""
    indices = [i for i, t in enumerate(dataset.targets) if t < num_classes][:limit]
    return Subset(dataset, indices)


def build(weights: str, pretrained: bool, num_classes: int, in_chans: int, img_size: int):
    """The architecture named by ``weights``, with (``pretrained``) or without its weights, for the new task."""
    return timm.create_model(weights, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                             img_size=img_size)


def finetune(model, loader, steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    step, start = 0, time.time()
    while step < steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
    return time.time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--weights', default='titn_tiny_patch8_32.cifar10')
    p.add_argument('--dataset', default='mnist')
    shared = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')
    p.add_argument('--data-dir', default=shared if os.path.isdir(shared) else 'data')
    p.add_argument('--num-images', type=int, default=5000)
    p.add_argument('--test-images', type=int, default=2000)
    p.add_argument('--classes', type=int, default=5, help='keep the first N classes (a new class count)')
    p.add_argument('--img-size', type=int, default=48, help='a new input size (patch_pos is resampled)')
    p.add_argument('--steps', type=int, default=150)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)

    info = DATASETS[args.dataset]
    train_tf = build_transforms(args.dataset, args.img_size, info.mean, info.std, is_training=True)
    eval_tf = build_transforms(args.dataset, args.img_size, info.mean, info.std, is_training=False)
    train = first_classes(build_dataset(args.dataset, args.data_dir, 'train', train_tf), args.classes,
                          args.num_images)
    test = first_classes(build_dataset(args.dataset, args.data_dir, 'test', eval_tf), args.classes,
                         args.test_images)
    results = {}
    for pretrained in (True, False):
        torch.manual_seed(args.seed)
        model = build(args.weights, pretrained, args.classes, info.in_chans, args.img_size)
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed))
        seconds = finetune(model, loader, args.steps, args.lr)
        metrics = evaluate(model, DataLoader(test, batch_size=256), args.classes)
        key = 'pretrained' if pretrained else 'scratch'
        results[key] = dict(top1=metrics['top1'], f1=metrics['f1'], train_seconds=seconds)
        print(f"{key:>10}: top-1 {metrics['top1']:.2f}%  macro-F1 {metrics['f1']:.4f}  "
              f"({args.steps} steps, {seconds:.0f} s)")
    results['setup'] = vars(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == '__main__':
    main()
