"""The main job: what a user of titn-lib comes for, in a few minutes on a CPU.

1. The pretrained CIFAR-10 student and its teacher, loaded as ``pretrained=True`` loads them (``local-dir:`` for
   the folders in ``weights/``, the Hub id elsewhere), evaluated on the full CIFAR-10 test split and printed in the
   layout of the paper's Table 4.
2. Fine-tuning those weights on a task they have not seen (MNIST digits: another dataset, one channel instead of
   three) with the paper's loss, ``TITNDistillLoss``, distilling from the published MNIST teacher; beside it the
   same number of steps from scratch.
3. Pictures: test images with their true and predicted labels, and the two fine-tuning curves.

Data: ``--data-dir`` (default ``../shared/data`` where it exists, else ``./data``); CIFAR-10 and MNIST are read as
``.npz`` or torchvision files there, else downloaded by torchvision when online.

    python examples/quickstart.py [--data-dir DIR] [--output output/quickstart] [--steps 150]
"""
import argparse
import json
import os
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, Subset

import titn_lib
from titn_lib.constants import CIFAR10_LABELS
from titn_lib.data import DATASETS, build_dataset, build_transforms
from titn_lib.evaluate import evaluate, run_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT, TEACHER, MNIST_TEACHER = 'titn_tiny_patch8_32.cifar10', 'aircnn_wide_32.cifar10', 'aircnn_small_32.mnist'


def weights(name: str) -> str:
    """The name ``timm.create_model(..., pretrained=True)`` loads: the shipped folder when present, else the Hub."""
    folder = os.path.join(REPO, 'weights', name)
    return f'local-dir:{os.path.relpath(folder)}' if os.path.isfile(os.path.join(folder, 'model.safetensors')) else name


def find_data(data_dir: str, name: str, split: str, transform=None):
    """The split from ``data_dir``; else torchvision's download into it; else one message and exit 1."""
    try:
        return build_dataset(name, data_dir, split, transform)
    except FileNotFoundError:
        pass
    try:
        return build_dataset(name, data_dir, split, transform, download=True)
    except Exception as e:  # no network: urllib's errors, torchvision's RuntimeError
        print(f'quickstart: no {name} {split} split in {data_dir} and it could not be downloaded '
              f'({type(e).__name__}). Run once with a network connection (torchvision downloads it to {data_dir}), or '
              f'put {name}/{split}.npz or the torchvision files there and pass --data-dir.', file=sys.stderr)
        raise SystemExit(1)


def predictions_grid(model, dataset, path: str, count: int = 32) -> None:
    """``count`` test images with their true and predicted labels (wrong predictions in red)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    info = DATASETS['cifar10']
    images = torch.stack([dataset[i][0] for i in range(count)])
    with torch.inference_mode():
        predicted = model(images).argmax(1)
    shown = (images * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)).clamp(0, 1)
    fig, axes = plt.subplots(4, count // 4, figsize=(count // 4 * 1.6, 4 * 1.9))
    for ax, image, p, i in zip(axes.flat, shown, predicted.tolist(), range(count)):
        truth = dataset[i][1]
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation='nearest')
        ax.set_title(f'{CIFAR10_LABELS[truth]}\n-> {CIFAR10_LABELS[p]}', fontsize=7,
                     color='black' if p == truth else 'red')
        ax.axis('off')
    fig.suptitle(f'{STUDENT}: CIFAR-10 test images, true label -> prediction', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune(pretrained: bool, train, test, steps: int, batch_size: int, lr: float, eval_every: int, seed: int):
    """``steps`` AdamW steps of the paper's loss on MNIST; returns ``[(step, test top-1)]`` and the seconds."""
    torch.manual_seed(seed)
    model = timm.create_model(weights(STUDENT) if pretrained else STUDENT.split('.')[0], pretrained=pretrained,
                              in_chans=1, num_classes=10)  # timm adapts the first conv to one channel
    model.set_distilled_training(True)
    teacher = timm.create_model(weights(MNIST_TEACHER), pretrained=True)
    criterion = titn_lib.TITNDistillLoss(teacher, alpha=0.5, distillation='hard')
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test, batch_size=250)
    curve, step, seconds = [(0, evaluate(model, test_loader, 10)['top1'])], 0, 0.0
    while step < steps:
        for images, labels in loader:
            start = time.time()
            model.train()
            loss = criterion(images, model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            seconds += time.time() - start
            step += 1
            if step % eval_every == 0 or step == steps:
                curve.append((step, evaluate(model, test_loader, 10)['top1']))
            if step == steps:
                break
    return curve, seconds


def plot_curves(curves: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(*zip(*curve), marker='o', label=label)
    ax.set(xlabel='fine-tuning step', ylabel='MNIST test top-1 (%)', title=title)
    ax.grid(alpha=.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    default_data = os.path.join(REPO, '..', 'shared', 'data')
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default=default_data if os.path.isdir(default_data) else 'data')
    p.add_argument('--output', default='output/quickstart')
    p.add_argument('--eval-images', type=int, default=0, help='CIFAR-10 test images to evaluate (0: all 10,000)')
    p.add_argument('--train-images', type=int, default=4000, help='MNIST images to fine-tune on')
    p.add_argument('--test-images', type=int, default=1000, help='MNIST test images for the curves')
    p.add_argument('--steps', type=int, default=150)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--eval-every', type=int, default=25)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    started = time.time()

    # 1. the pretrained weights on the full CIFAR-10 test split, in the paper's table layout
    find_data(args.data_dir, 'cifar10', 'test')
    print(f'1. {STUDENT} and its teacher on the CIFAR-10 test split (loaded as pretrained=True loads them):')
    rows = run_eval([weights(STUDENT), weights(TEACHER)], 'cifar10', args.data_dir, workers=0,
                    json_path=os.path.join(args.output, 'cifar10_eval.json'), limit=args.eval_images or None)
    student = timm.create_model(weights(STUDENT), pretrained=True).eval()
    cifar_info = DATASETS['cifar10']
    cifar_test = find_data(args.data_dir, 'cifar10', 'test',
                           build_transforms('cifar10', 32, cifar_info.mean, cifar_info.std, is_training=False))
    grid = os.path.join(args.output, 'cifar10_predictions.png')
    predictions_grid(student, cifar_test, grid)

    # 2. fine-tuning on MNIST with the paper's loss, from the CIFAR-10 weights and from scratch
    mnist_info = DATASETS['mnist']
    train = find_data(args.data_dir, 'mnist', 'train',
                      build_transforms('mnist', 32, mnist_info.mean, mnist_info.std, is_training=True))
    test = find_data(args.data_dir, 'mnist', 'test',
                     build_transforms('mnist', 32, mnist_info.mean, mnist_info.std, is_training=False))
    train, test = Subset(train, range(args.train_images)), Subset(test, range(args.test_images))
    print(f'\n2. fine-tuning on MNIST ({args.train_images} images, {args.steps} steps of {args.batch_size}, '
          f'hard distillation from {MNIST_TEACHER}); top-1 on {args.test_images} MNIST test images:')
    curves, seconds = {}, {}
    for label, pretrained in (('from the CIFAR-10 weights', True), ('from scratch', False)):
        curves[label], seconds[label] = finetune(pretrained, train, test, args.steps, args.batch_size, args.lr,
                                                 args.eval_every, args.seed)
        print(f'   {label:>26}: ' + '  '.join(f'{s}: {a:.1f}' for s, a in curves[label]) +
              f'  ({seconds[label]:.0f} s)')
    curve_png = os.path.join(args.output, 'finetune_curves.png')
    plot_curves(curves, curve_png, f'{STUDENT} fine-tuned on MNIST with TITNDistillLoss')

    summary = dict(cifar10=rows, finetune=curves, finetune_seconds=seconds, setup=vars(args),
                   wall_seconds=time.time() - started)
    with open(os.path.join(args.output, 'quickstart.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'\n3. pictures: {grid} (test images, true -> predicted label), {curve_png} (fine-tuning curves); '
          f'numbers: {os.path.join(args.output, "quickstart.json")}. {time.time() - started:.0f} s in all.')
    return summary


if __name__ == '__main__':
    main()
