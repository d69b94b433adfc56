"""Datasets, splits and the paper's augmentations (§3.4, §4.1).

Sources: torchvision's CIFAR-10 / CIFAR-100 / MNIST (downloaded with ``download=True`` when online), ``.npz``
arrays, and ImageFolder trees. The ``.npz`` format: one file per split (``train.npz``, ``test.npz``) holding
``images`` (uint8, ``[N, H, W]`` or ``[N, H, W, C]``) and ``labels`` (int, ``[N]``), written with
``np.savez`` / ``np.savez_compressed`` (no pickle). ``../shared/data/{mnist,cifar10}`` is in this format.
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data import Mixup
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from .titn import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, MNIST_MEAN, MNIST_STD

__all__ = ['DatasetInfo', 'DATASETS', 'NpzDataset', 'build_dataset', 'train_val_indices', 'build_transforms',
           'build_mixup']


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    img_size: int = 32


DATASETS = {
    'mnist': DatasetInfo(10, 1, MNIST_MEAN, MNIST_STD),
    'cifar10': DatasetInfo(10, 3, CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': DatasetInfo(100, 3, CIFAR100_MEAN, CIFAR100_STD),
}


class NpzDataset(Dataset):
    """Images and labels from one ``.npz`` file (see the module docstring); items are ``(PIL image, int)``."""

    def __init__(self, path: str, transform: Optional[Callable] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no .npz split at {path}: expected a file with arrays "images" and "labels"')
        try:
            with np.load(path, allow_pickle=False) as f:
                self.images, self.labels = f['images'], f['labels'].astype(np.int64)
        except (KeyError, ValueError, OSError, EOFError) as e:
            raise ValueError(f'{path} is not a readable .npz with "images" (uint8 [N,H,W(,C)]) and "labels" '
                             f'([N]) arrays: {e}') from e
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4) or len(self.images) != len(self.labels):
            raise ValueError(f'{path}: expected uint8 images [N,H,W(,C)] and N labels, got images '
                             f'{self.images.dtype}{list(self.images.shape)} and {len(self.labels)} labels')
        self.targets = self.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def build_dataset(name: str, root: str, split: str, transform: Optional[Callable] = None, download: bool = False):
    """``name``: ``mnist``, ``cifar10``, ``cifar100`` (an ``.npz`` pair under ``root`` or ``root/<name>`` is used
    when present, else torchvision's format), ``npz`` (``root/<split>.npz``) or ``imagefolder``
    (``root/<split>/<class>/*``). ``split``: ``train`` or ``test``."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == 'imagefolder':
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'no ImageFolder split at {folder}: expected {folder}/<class>/<image files>')
        return datasets.ImageFolder(folder, transform=transform)
    if name != 'npz' and name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}: choose one of {sorted(DATASETS) + ["npz", "imagefolder"]}')
    for folder in (root, os.path.join(root, name)):
        path = os.path.join(folder, f'{split}.npz')
        if os.path.isfile(path):
            return NpzDataset(path, transform)
    if name == 'npz':
        raise FileNotFoundError(f'no {split}.npz in {root}')
    tv_class = {'mnist': datasets.MNIST, 'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100}[name]
    try:
        return tv_class(root, train=split == 'train', transform=transform, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f'{name} {split} split not found under {root!r}: put {split}.npz there, or the torchvision '
            f'{tv_class.__name__} files, or pass --download when online ({e})') from e


def train_val_indices(targets: Sequence[int], val_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A class-stratified, seeded split of the train set: ``(train_indices, val_indices)``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f'val_fraction must lie in [0, 1), got {val_fraction}')
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        val.append(rng.permutation(idx)[:int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(targets)), val)
    return train, val


def subset(dataset, indices) -> Subset:
    return Subset(dataset, [int(i) for i in indices])


def build_transforms(
        dataset: str,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        is_training: bool,
        aa: Optional[str] = None,
        hflip: float = 0.5,
        crop_padding: int = 4,
) -> Callable:
    """The paper's augmentations (§3.4, §4.1).

    CIFAR (and other RGB data): random crop with padding, horizontal flip, AutoAugment (``aa``: a torchvision
    policy ``cifar10``/``imagenet``/``svhn``, or a timm ``rand-*`` / ``augmix-*`` string). MNIST: resize, random
    crop, rotation, affine and colour jitter. Evaluation: resize to ``img_size`` when needed, normalise.
    """
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize(img_size, interpolation=T.InterpolationMode.BILINEAR)]
    if not is_training:
        return T.Compose(resize + tail)
    if dataset == 'mnist':
        aug = resize + [
            T.RandomCrop(img_size, padding=2),
            T.RandomRotation(10),
            T.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            T.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    else:
        aug = resize + [T.RandomCrop(img_size, padding=crop_padding)]
        if hflip > 0:
            aug.append(T.RandomHorizontalFlip(hflip))
    if aa and aa != 'none':
        aug.append(_auto_augment(aa, img_size, mean))
    return T.Compose(aug + tail)


def _auto_augment(aa: str, img_size: int, mean: Sequence[float]) -> Callable:
    policies = {p.value: p for p in T.AutoAugmentPolicy}
    if aa in policies:
        return T.AutoAugment(policies[aa])
    from timm.data.auto_augment import augment_and_mix_transform, rand_augment_transform
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
    if aa.startswith('rand'):
        return rand_augment_transform(aa, hparams)
    if aa.startswith('augmix'):
        return augment_and_mix_transform(aa, hparams)
    raise ValueError(f'unknown --aa {aa!r}: use one of {sorted(policies)}, a timm "rand-..." or "augmix-..." '
                     f'string, or "none"')


def build_mixup(mixup: float, cutmix: float, num_classes: int, smoothing: float = 0.0,
                prob: float = 1.0, switch_prob: float = 0.5) -> Optional[Mixup]:
    """timm's ``Mixup`` (CutMix with ``cutmix > 0``, the paper's alpha 0.5); ``None`` when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                 label_smoothing=smoothing, num_classes=num_classes)

