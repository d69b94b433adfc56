"""Images/s of titn train's input pipeline (decode, the paper's augmentations, collate; Mixup/CutMix on the batch),
to compare with the model's training images/s from benchmarks/throughput.py: the loader must be faster.

    python benchmarks/data_loading.py --data-dir ../shared/data
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader

from titn_lib.data import DATASETS, build_dataset, build_mixup, build_transforms

SETTINGS = {  # the recipes' training pipelines
    'mnist': dict(aa=None, cutmix=0.0),
    'cifar10': dict(aa='cifar10', cutmix=0.5),
}


def images_per_second(dataset, workers: int, batch_size: int, batches: int, mixup) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per epoch, not per batch
    start = time.perf_counter()
    for _ in range(batches):
        images, targets = next(iterator)
        if mixup is not None:
            mixup(images, targets)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default='../shared/data')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--batches', type=int, default=20)
    args = p.parse_args()
    print(f'threads {torch.get_num_threads()}\n')
    print('| dataset | augmentations | workers | loader img/s |')
    print('|---|---|---|---|')
    for name, setting in SETTINGS.items():
        info = DATASETS[name]
        tf = build_transforms(name, 32, info.mean, info.std, is_training=True, aa=setting['aa'])
        dataset = build_dataset(name, args.data_dir, 'train', tf)
        mixup = build_mixup(0.0, setting['cutmix'], info.num_classes)
        augs = 'resize, crop, rotation, affine, jitter' if name == 'mnist' else 'crop, flip, AutoAugment, CutMix'
        for workers in args.workers:
            rate = images_per_second(dataset, workers, args.batch_size, args.batches, mixup)
            print(f'| {name} | {augs} | {workers} | {rate:.0f} |')


if __name__ == '__main__':
    main()
