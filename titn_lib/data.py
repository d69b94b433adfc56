"""Datasets, splits and the paper's augmentations (§3.4, §4.1).

Sources: torchvision's CIFAR-10 / CIFAR-100 / MNIST (downloaded with ``download=True`` when online), ``.npz``
arrays, and ImageFolder trees. The ``.npz`` format: one file per split (``train.npz``, ``test.npz``) holding
``images`` (uint8, ``[N, H, W]`` or ``[N, H, W, C]``) and ``labels`` (int, ``[N]``), written with
``np.savez`` / ``np.savez_compressed`` (no pickle). ``../shared/data/{mnist,cifar10}`` is in this format.

Two ways to feed training: ``DataLoader`` worker processes with the PIL transforms of :func:`build_transforms`, or
:class:`DeviceLoader`, which holds an in-memory split on the training device and applies the same augmentations to
whole batches there (``titn train --loader device``).
"""
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from .constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, MNIST_MEAN, MNIST_STD

__all__ = ['DatasetInfo', 'DATASETS', 'NpzDataset', 'build_dataset', 'train_val_indices', 'build_transforms',
           'build_mixup', 'dataset_tensors', 'normalised_images', 'DeviceLoader']


MNIST_AUGS = ('paper', 'crop', 'elastic')
# Elastic distortion for ``mnist_aug='elastic'``, in torchvision's ``ElasticTransform`` units (a pixel displacement is
# ``alpha / 2`` times the Gaussian-smoothed uniform field): Ciresan et al. (2010), whose non-convolutional networks
# reached 99.65% on MNIST with it, used sigma 5-6 and alpha 36-38 pixels on 29x29 digits; here 6 and 40 pixels at 32x32.
MNIST_ELASTIC = dict(alpha=80.0, sigma=6.0)


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
        if self.labels.ndim == 2 and self.labels.shape[1] == 1:  # [N, 1], as some exporters write them
            self.labels = self.labels[:, 0]
        if self.labels.ndim != 1:
            raise ValueError(f'{path}: expected labels [N] (class indices), got shape {list(self.labels.shape)}')
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


def npz_channels(root: str, split: str = 'train') -> int:
    """The channel count of ``root/<split>.npz`` (1 for ``[N, H, W]`` images), read from the array header only."""
    import zipfile
    path = os.path.join(root, f'{split}.npz')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no {split}.npz in {root}: expected a file with arrays "images" and "labels"')
    try:
        with zipfile.ZipFile(path) as z, z.open('images.npy') as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape = read_header(f)[0]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise ValueError(f'{path} is not a readable .npz with an "images" array: {e}') from e
    if len(shape) not in (3, 4):
        raise ValueError(f'{path}: images must be [N, H, W] or [N, H, W, C], got shape {list(shape)}')
    return 1 if len(shape) == 3 else shape[3]


def default_stats(in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """ImageNet's mean and std for RGB data; their channel averages for other channel counts (as timm)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if in_chans == 3:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    mean, std = sum(IMAGENET_DEFAULT_MEAN) / 3, sum(IMAGENET_DEFAULT_STD) / 3
    return (mean,) * in_chans, (std,) * in_chans


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
        re_prob: float = 0.0,
        re_mode: str = 'pixel',
        mnist_aug: str = 'paper',
) -> Callable:
    """The paper's augmentations (§3.4, §4.1).

    CIFAR (and other RGB data): random crop with padding, horizontal flip, AutoAugment (``aa``: a torchvision
    policy ``cifar10``/``imagenet``/``svhn``, or a timm ``rand-*`` / ``augmix-*`` string). MNIST: resize, random
    crop, rotation, affine and colour jitter (``mnist_aug='paper'``), the random crop alone (``'crop'``), or the paper's
    augmentations followed by an elastic distortion (``'elastic'``, not in the paper: see :data:`MNIST_ELASTIC`).
    Evaluation: resize to ``img_size`` when needed, normalise.
    Not in the paper, off by default: timm's random erasing (``re_prob``, ``re_mode``) after normalisation, as
    DeiT and timm's ``create_transform`` place it.
    """
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize(img_size, interpolation=T.InterpolationMode.BILINEAR)]
    if not is_training:
        return T.Compose(resize + tail)
    if dataset == 'mnist':
        aug = resize + [T.RandomCrop(img_size, padding=2)]
        if _check_mnist_aug(mnist_aug) in ('paper', 'elastic'):
            aug += [T.RandomRotation(10), T.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                    T.ColorJitter(brightness=0.2, contrast=0.2)]
        if mnist_aug == 'elastic':
            aug.append(T.ElasticTransform(**MNIST_ELASTIC))
    else:
        aug = resize + [T.RandomCrop(img_size, padding=crop_padding)]
        if hflip > 0:
            aug.append(T.RandomHorizontalFlip(hflip))
    if aa and aa != 'none':
        aug.append(_auto_augment(aa, img_size, mean))
    if re_prob > 0:
        tail.append(RandomErasing(re_prob, mode=re_mode, device='cpu'))
    return T.Compose(aug + tail)


def _check_mnist_aug(mnist_aug: str) -> str:
    if mnist_aug not in MNIST_AUGS:
        raise ValueError(f"mnist_aug must be one of {', '.join(map(repr, MNIST_AUGS))}, got {mnist_aug!r}")
    return mnist_aug


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


# who needs an in-memory dataset, in the error for one that is not
DEVICE_LOADER_NEEDS = '--loader device (--loader workers reads any dataset)'


def dataset_tensors(dataset, needed_by: str = DEVICE_LOADER_NEEDS) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, C, H, W], labels int64 [N])`` of an in-memory dataset: an :class:`NpzDataset`,
    torchvision's CIFAR / MNIST, or a ``Subset`` of one, at any depth (what :class:`DeviceLoader` holds on the
    device)."""
    indices = None  # into the innermost dataset
    while isinstance(dataset, Subset):
        index = np.asarray(dataset.indices, dtype=np.int64)
        indices, dataset = (index if indices is None else index[indices]), dataset.dataset
    if isinstance(dataset, NpzDataset):
        images, labels = dataset.images, dataset.labels
    elif isinstance(getattr(dataset, 'data', None), (np.ndarray, torch.Tensor)):
        images, labels = dataset.data, dataset.targets
    else:
        raise ValueError(f'{type(dataset).__name__} does not hold its images in memory; {needed_by} needs '
                         f'an .npz split or torchvision\'s CIFAR / MNIST')
    images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:  # [N, H, W] grayscale
        images = images[..., None]
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if indices is not None:
        index = torch.from_numpy(indices)
        images, labels = images[index], labels[index]
    return images.permute(0, 3, 1, 2).contiguous(), labels


def resize_uint8(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """``T.Resize(img_size)`` (bilinear, antialiased) of a uint8 batch, when its size differs."""
    if tuple(images.shape[-2:]) == (img_size, img_size):
        return images
    from torchvision.transforms.v2 import functional as TF
    return TF.resize(images, [img_size, img_size], antialias=True)


def normalised_images(dataset, count: int, mean: Sequence[float], std: Sequence[float], img_size: int,
                      needed_by: str) -> torch.Tensor:
    """The first ``count`` images of an in-memory ``dataset`` as the evaluation transform gives them (resized,
    normalised; float32 [N, C, H, W]), for data-dependent initialisations."""
    head = Subset(dataset, range(min(count, len(dataset))))
    loader = DeviceLoader(head, count, mean, std, img_size, torch.device('cpu'), needed_by=needed_by)
    return next(iter(loader))[0]


def random_crop_flip(x: torch.Tensor, padding: int, hflip: float) -> torch.Tensor:
    """``T.RandomCrop(padding=padding)`` (zero fill) and ``T.RandomHorizontalFlip(hflip)``, drawn per image."""
    B, C, H, W = x.shape
    if padding > 0:
        x = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (B, 1, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (B, 1, 1, 1), device=x.device)
        rows = dy + torch.arange(H, device=x.device).view(1, 1, H, 1)
        cols = dx + torch.arange(W, device=x.device).view(1, 1, 1, W)
        x = x[torch.arange(B, device=x.device).view(B, 1, 1, 1), torch.arange(C, device=x.device).view(1, C, 1, 1),
              rows, cols]
    if hflip > 0:
        flip = torch.rand(B, 1, 1, 1, device=x.device) < hflip
        x = torch.where(flip, x.flip(3), x)
    return x


def random_affine_jitter(x: torch.Tensor, degrees: float, translate: float, scale: Tuple[float, float],
                         brightness: float, contrast: float) -> torch.Tensor:
    """The MNIST augmentations of :func:`build_transforms` (rotation, translation and scale, brightness and
    contrast jitter), drawn per image and applied to the whole batch at once; ``x`` is float in [0, 255]."""
    B, device = x.shape[0], x.device
    angle = torch.empty(B, device=device).uniform_(-degrees, degrees).deg2rad()
    zoom = torch.empty(B, device=device).uniform_(*scale)
    shift = torch.empty(B, 2, device=device).uniform_(-2 * translate, 2 * translate)  # in [-1, 1] units
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # output -> input
    theta = torch.cat([rot, -(rot @ shift[:, :, None])], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    x = x * torch.empty(B, 1, 1, 1, device=device).uniform_(1 - brightness, 1 + brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = torch.empty(B, 1, 1, 1, device=device).uniform_(1 - contrast, 1 + contrast)
    return ((x - mean) * c + mean).clamp_(0, 255)


def random_elastic(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """``v2.ElasticTransform(alpha, sigma)`` (bilinear, fill 0) with a displacement field drawn per image; on a
    one-image batch it draws what torchvision's does and gives its result to float rounding. ``x`` is float
    ``[B, C, H, W]``."""
    from torchvision.transforms.v2 import functional as TF
    B, C, H, W = x.shape
    field = torch.rand(B, 2, H, W, device=x.device) * 2 - 1  # (dx, dy) per image, torchvision's draw order
    size = int(8 * sigma + 1) | 1
    field = TF.gaussian_blur(field.view(B * 2, 1, H, W), [size, size], [sigma, sigma]).view(B, 2, H, W)
    field = field * alpha / torch.tensor([W, H], device=x.device, dtype=x.dtype).view(1, 2, 1, 1)
    identity = F.affine_grid(torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(B, 2, 3), [B, C, H, W],
                             align_corners=False)
    x = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), identity + field.permute(0, 2, 3, 1),
                      mode='bilinear', padding_mode='zeros', align_corners=False)
    return x[:, :C] * x[:, C:]  # torchvision's fill: a pixel is scaled by its share from inside the image


def _device_policy(aa: Optional[str]) -> Optional[Callable]:
    """A torchvision v2 AutoAugment / RandAugment that works on uint8 batches on any device."""
    if not aa or aa == 'none':
        return None
    from torchvision.transforms import v2
    policies = {p.value: p for p in v2.AutoAugmentPolicy}
    if aa in policies:
        return v2.AutoAugment(policies[aa])
    if aa == 'randaugment':
        return v2.RandAugment()
    raise ValueError(f'--aa {aa!r} has no batched version for --loader device: use one of '
                     f'{sorted(policies) + ["randaugment"]}, or --loader workers for timm\'s "rand-..." policies')


class DeviceLoader:
    """A whole split held on the training device as one uint8 tensor and augmented there, a batch at a time.

    The augmentations of :func:`build_transforms` without worker processes or per-image Python, which is what
    keeps a GPU busy on 32x32 data (and spares the cores of a small CPU): crop with padding and flip (RGB
    data) or crop, rotation, translation, scale and jitter (``mnist``; the crop alone with ``mnist_aug='crop'``, and
    an elastic distortion after them with ``'elastic'``) are drawn per image; the AutoAugment / RandAugment policy
    (``aa``) is drawn once per group of ``aug_group`` images; timm's random erasing (``re_prob``) is drawn per image
    on the normalised batch. Randomness comes from torch's and Python's global generators, so seeding them at an
    epoch start fixes that epoch. Yields normalised float batches.
    ``needed_by`` names the caller in the error for a dataset that is not held in memory.
    """

    def __init__(
            self,
            dataset,
            batch_size: int,
            mean: Sequence[float],
            std: Sequence[float],
            img_size: int,
            device: torch.device,
            *,
            kind: str = 'cifar10',
            train: bool = False,
            aa: Optional[str] = None,
            aug_group: int = 32,
            crop_padding: int = 4,
            hflip: float = 0.5,
            re_prob: float = 0.0,
            re_mode: str = 'pixel',
            mnist_aug: str = 'paper',
            rank: int = 0,
            world_size: int = 1,
            needed_by: str = DEVICE_LOADER_NEEDS,
    ):
        images, self.labels = dataset_tensors(dataset, needed_by)
        self.images, self.labels = resize_uint8(images.to(device), img_size), self.labels.to(device)
        self.batch_size, self.device, self.kind, self.train = batch_size, device, kind, train
        self.policy = _device_policy(aa) if train else None
        self.aug_group, self.crop_padding, self.hflip = aug_group, crop_padding, hflip
        self.mnist_aug = _check_mnist_aug(mnist_aug)
        self.erase = RandomErasing(re_prob, mode=re_mode, device=device) if train and re_prob > 0 else None
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.labels) // self.world_size
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch in, float batch in [0, 255] out."""
        if self.kind == 'mnist':
            x = random_crop_flip(x, padding=2, hflip=0)
            if self.mnist_aug in ('paper', 'elastic'):
                x = random_affine_jitter(x.float(), degrees=10, translate=0.1, scale=(0.9, 1.1), brightness=0.2,
                                         contrast=0.2)
            if self.mnist_aug == 'elastic':
                x = random_elastic(x, **MNIST_ELASTIC)
        else:
            x = random_crop_flip(x, self.crop_padding, self.hflip)
        if self.policy is not None:
            x = x.round().clamp(0, 255).to(torch.uint8) if x.is_floating_point() else x
            x = torch.cat([self.policy(group) for group in x.split(self.aug_group)])
        return x.float()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, device=self.device)[self.rank::self.world_size]
        else:
            order = torch.arange(n, device=self.device)[self.rank::self.world_size]
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[index]
            x = self.augment(x) if self.train else x.float()
            x = (x - self.mean) / self.std
            yield x if self.erase is None else self.erase(x), self.labels[index]
