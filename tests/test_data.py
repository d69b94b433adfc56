"""Datasets (.npz, torchvision CIFAR-100 format, ImageFolder), splits and transforms; real data when present."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, make_npz_split, needs_shared_data
from titn_lib.data import (NpzDataset, build_dataset, build_mixup, build_transforms, train_val_indices)


def write_cifar100_python(root, n_train=50, n_test=20):
    """The torchvision CIFAR-100 layout (cifar-100-python/{train,test,meta}), with synthetic pixels."""
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test)):
        entry = {'data': rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 'fine_labels': [i % 100 for i in range(n)], 'coarse_labels': [i % 20 for i in range(n)]}
        with open(folder / split, 'wb') as f:
            pickle.dump(entry, f)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'class{i}' for i in range(100)]}, f)


def test_cifar100_torchvision_format(tmp_path, monkeypatch):
    import torchvision
    write_cifar100_python(tmp_path)
    # torchvision checks the md5 of the real archive; these files are synthetic stand-ins of the same format
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *args: True)
    tf = build_transforms('cifar100', 32, (0.5,) * 3, (0.25,) * 3, is_training=True, aa='cifar10')
    train = build_dataset('cifar100', str(tmp_path), 'train', tf)
    test = build_dataset('cifar100', str(tmp_path), 'test')
    assert len(train) == 50 and len(test) == 20
    image, label = train[3]
    assert image.shape == (3, 32, 32) and label == 3
    assert train.classes[0] == 'class0'


def test_imagefolder(tmp_path):
    for split in ('train', 'test'):
        for c in ('cat', 'dog'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 40, 3), 50 * i, np.uint8)).save(tmp_path / split / c / f'{i}.png')
    tf = build_transforms('imagefolder', 32, (0.5,) * 3, (0.5,) * 3, is_training=False)
    ds = build_dataset('imagefolder', str(tmp_path), 'train', tf)
    assert len(ds) == 6 and ds.classes == ['cat', 'dog'] and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match='ImageFolder'):
        build_dataset('imagefolder', str(tmp_path / 'nope'), 'train')


def test_npz_grayscale_and_errors(tmp_path):
    make_npz_split(tmp_path / 'train.npz', 12, channels=1, size=28)
    ds = NpzDataset(str(tmp_path / 'train.npz'),
                    build_transforms('mnist', 32, (0.1307,), (0.3081,), is_training=True))
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and isinstance(label, int)
    np.savez(tmp_path / 'bad.npz', images=np.zeros((3, 4, 4), np.float32), labels=np.zeros(3))
    with pytest.raises(ValueError, match='uint8'):
        NpzDataset(str(tmp_path / 'bad.npz'))
    with pytest.raises(ValueError, match='unknown dataset'):
        build_dataset('svhn', str(tmp_path), 'train')
    with pytest.raises(ValueError, match='unknown --aa'):
        build_transforms('cifar10', 32, (0.5,) * 3, (0.5,) * 3, is_training=True, aa='bogus')


def test_validation_split_is_stratified_disjoint_and_seeded():
    targets = [i % 10 for i in range(1000)]
    train, val = train_val_indices(targets, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    assert np.bincount(np.asarray(targets)[val]).tolist() == [10] * 10
    again, _ = train_val_indices(targets, 0.1, seed=3)
    assert np.array_equal(train, again)
    assert not np.array_equal(train_val_indices(targets, 0.1, seed=4)[1], val)


def test_timm_rand_augment_and_mixup():
    tf = build_transforms('cifar10', 32, (0.5,) * 3, (0.5,) * 3, is_training=True, aa='rand-m9-mstd0.5')
    assert tf(Image.fromarray(np.zeros((32, 32, 3), np.uint8))).shape == (3, 32, 32)
    assert build_mixup(0, 0, 10) is None
    mixup = build_mixup(0, 0.5, 10)
    x, y = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))


@needs_shared_data
@pytest.mark.parametrize('name,n_train,shape', [('mnist', 60000, (1, 32, 32)), ('cifar10', 50000, (3, 32, 32))])
def test_shared_data(name, n_train, shape):
    tf = build_transforms(name, 32, (0.5,) * shape[0], (0.5,) * shape[0], is_training=False)
    train = build_dataset(name, SHARED_DATA, 'train', tf)
    test = build_dataset(name, SHARED_DATA, 'test', tf)
    assert len(train) == n_train and len(test) == 10000
    assert train[0][0].shape == shape
    first = {'mnist': [5, 0, 4, 1, 9], 'cifar10': [6, 9, 9, 4, 1]}[name]
    assert train.targets[:5] == first


def test_device_loader_eval_batches_equal_the_pil_pipeline(tmp_path):
    """--loader device, evaluation: the same tensors as the PIL transform (resize 28 -> 32 included)."""
    from titn_lib.data import DeviceLoader
    make_npz_split(tmp_path / 'train.npz', 10, channels=1, size=28)
    mean, std = (0.1307,), (0.3081,)
    ds = NpzDataset(str(tmp_path / 'train.npz'), build_transforms('mnist', 32, mean, std, is_training=False))
    loader = DeviceLoader(ds, 4, mean, std, 32, torch.device('cpu'), kind='mnist')
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and batches[-1][0].shape == (2, 1, 32, 32)
    images = torch.cat([x for x, _ in batches])
    expected = torch.stack([ds[i][0] for i in range(10)])
    assert images.dtype == torch.float32 and images.shape == expected.shape
    assert (images - expected).abs().max() <= 1.01 / 255 / std[0]  # at most one grey level (bilinear rounding)
    assert torch.cat([y for _, y in batches]).tolist() == ds.targets


def test_normalised_images_are_the_first_images_of_a_subset_as_evaluated(tmp_path):
    """The images behind --whiten-stem: a subset's first ``count`` images through the evaluation transform."""
    from titn_lib.data import normalised_images, subset
    make_npz_split(tmp_path / 'train.npz', 12, channels=1, size=28)
    mean, std = (0.1307,), (0.3081,)
    ds = NpzDataset(str(tmp_path / 'train.npz'), build_transforms('mnist', 32, mean, std, is_training=False))
    images = normalised_images(subset(ds, [7, 2, 9, 4]), 3, mean, std, 32, needed_by='--whiten-stem')
    expected = torch.stack([ds[i][0] for i in (7, 2, 9)])
    assert images.shape == expected.shape and (images - expected).abs().max() <= 1.01 / 255 / std[0]
    assert normalised_images(ds, 50, mean, std, 32, needed_by='--whiten-stem').shape == (12, 1, 32, 32)
    with pytest.raises(ValueError, match='--whiten-stem needs an .npz split'):
        normalised_images(list(ds), 3, mean, std, 32, needed_by='--whiten-stem')


def test_device_loader_training_batches(tmp_path):
    from titn_lib.data import DeviceLoader, dataset_tensors, subset
    make_npz_split(tmp_path / 'train.npz', 40)
    ds = subset(NpzDataset(str(tmp_path / 'train.npz')), range(0, 40, 2))
    images, labels = dataset_tensors(ds)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == [i % 3 for i in
                                                                                                   range(0, 40, 2)]
    loader = DeviceLoader(ds, 8, (0.5,) * 3, (0.25,) * 3, 32, torch.device('cpu'), train=True, aa='cifar10',
                          aug_group=4)
    torch.manual_seed(1)
    first = list(loader)
    assert len(first) == 2 and all(x.shape == (8, 3, 32, 32) and y.shape == (8,) for x, y in first)  # drop_last
    torch.manual_seed(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader))  # seeded: an epoch repeats exactly
    with pytest.raises(ValueError, match='no batched version'):
        DeviceLoader(ds, 8, (0.5,) * 3, (0.25,) * 3, 32, torch.device('cpu'), train=True, aa='rand-m9')


def test_random_erasing_in_both_loaders(tmp_path):
    """--reprob: timm's RandomErasing after normalisation, per image, seeded like the rest of an epoch."""
    import random
    from titn_lib.data import DeviceLoader
    make_npz_split(tmp_path / 'train.npz', 16)
    mean, std = (0.5,) * 3, (0.25,) * 3
    tf = build_transforms('cifar10', 32, mean, std, is_training=True, re_prob=1.0, re_mode='const')
    assert type(tf.transforms[-1]).__name__ == 'RandomErasing'
    assert 'RandomErasing' not in repr(build_transforms('cifar10', 32, mean, std, is_training=True))
    image = tf(Image.fromarray(np.full((32, 32, 3), 255, np.uint8)))  # 2.0, or -2.0 in the crop's padding
    assert 0.02 * 1024 <= (image == 0).all(0).sum() <= 1024 / 3 + 32

    ds = NpzDataset(str(tmp_path / 'train.npz'))
    plain = DeviceLoader(ds, 8, mean, std, 32, torch.device('cpu'), train=True, crop_padding=0, hflip=0)
    loader = DeviceLoader(ds, 8, mean, std, 32, torch.device('cpu'), train=True, crop_padding=0, hflip=0,
                          re_prob=1.0, re_mode='const')
    batches = []
    for _ in range(2):
        torch.manual_seed(3), random.seed(3)
        batches.append(next(iter(loader))[0])
    torch.manual_seed(3)
    clean = next(iter(plain))[0]
    changed = (batches[0] != clean).flatten(2).any(1)  # pixels erased, per image
    assert torch.equal(batches[0], batches[1])  # seeded: the same rectangles again
    assert (changed.sum(1) >= 0.02 * 1024).all()
    assert (batches[0][changed.view(8, 1, 32, 32).expand_as(clean)] == 0).all()  # const mode: zero-filled
    assert plain.erase is None and DeviceLoader(ds, 8, mean, std, 32, torch.device('cpu'), re_prob=1.0).erase is None


def test_random_crop_flip_and_affine():
    from titn_lib.data import random_affine_jitter, random_crop_flip
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    assert torch.equal(random_crop_flip(x, padding=0, hflip=1.0), x.flip(3))
    torch.manual_seed(0)
    crops = random_crop_flip(x, padding=2, hflip=0)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):  # each crop is a 4x4 window of its own zero-padded image
        windows = padded[i, 0].unfold(0, 4, 1).unfold(1, 4, 1).reshape(-1, 4, 4)
        assert any(torch.equal(w, crops[i, 0]) for w in windows)
    same = random_affine_jitter(x.float(), degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    assert torch.allclose(same, x.float())
    moved = random_affine_jitter(x.float().repeat(8, 1, 1, 1), 10, 0.1, (0.9, 1.1), 0.2, 0.2)
    assert moved.shape == (16, 1, 4, 4) and 0 <= moved.min() and moved.max() <= 255


def test_mnist_crop_augmentation_only_shifts(tmp_path):
    """mnist_aug='crop': every training image is a 32x32 window of its 2-pixel zero-padded original, on both
    loaders; 'paper' adds rotation, affine and jitter; anything else is refused."""
    from titn_lib.data import DeviceLoader
    make_npz_split(tmp_path / 'train.npz', 16, channels=1, size=32)
    mean, std = (0.0,), (1 / 255,)  # normalised values stay grey levels
    ds = NpzDataset(str(tmp_path / 'train.npz'))
    originals = torch.nn.functional.pad(torch.from_numpy(ds.images).view(16, 1, 32, 32).float(), (2,) * 4)
    torch.manual_seed(0)
    crop = DeviceLoader(ds, 16, mean, std, 32, torch.device('cpu'), kind='mnist', train=True, mnist_aug='crop')
    paper = DeviceLoader(ds, 16, mean, std, 32, torch.device('cpu'), kind='mnist', train=True)
    (x, y), = list(crop)
    (x_paper, y_paper), = list(paper)
    for image, label in zip(x, y):
        candidates = [i for i in range(16) if ds.targets[i] == label]
        windows = [originals[i, 0].unfold(0, 32, 1).unfold(1, 32, 1).reshape(-1, 32, 32) for i in candidates]
        assert any(torch.equal(w, image[0]) for ws in windows for w in ws)
    assert not torch.equal(x_paper, x_paper.round())  # interpolated: not a plain shift
    tf = build_transforms('mnist', 32, mean, std, is_training=True, mnist_aug='crop')
    assert [type(t).__name__ for t in tf.transforms] == ['Resize', 'RandomCrop', 'ToTensor', 'Normalize']
    with pytest.raises(ValueError, match="mnist_aug must be one of 'paper', 'crop', 'elastic', got 'light'"):
        DeviceLoader(ds, 16, mean, std, 32, torch.device('cpu'), kind='mnist', train=True, mnist_aug='light')


def test_device_elastic_distortion_is_torchvisions_per_image(tmp_path):
    """mnist_aug='elastic': the device loader's distortion draws and applies what torchvision's ElasticTransform
    does (same seed, one image), with a field of its own for each image; the PIL pipeline appends ElasticTransform
    after the paper's augmentations."""
    from torchvision.transforms import v2
    from titn_lib.data import MNIST_ELASTIC, DeviceLoader, random_elastic
    x = torch.rand(3, 2, 32, 32) * 255
    torch.manual_seed(0)
    ours = random_elastic(x, **MNIST_ELASTIC)
    torch.manual_seed(0)
    theirs = v2.ElasticTransform(**MNIST_ELASTIC)(x[:1])
    assert torch.allclose(ours[:1], theirs, atol=1e-3) and not torch.allclose(ours[:1], x[:1], atol=1)
    same_input = random_elastic(x[:1].repeat(2, 1, 1, 1), **MNIST_ELASTIC)
    assert not torch.allclose(same_input[0], same_input[1], atol=1)  # a field per image
    assert torch.allclose(random_elastic(x, alpha=0.0, sigma=6.0), x, atol=1e-3)  # no displacement: the image
    make_npz_split(tmp_path / 'train.npz', 16, channels=1, size=32)
    ds = NpzDataset(str(tmp_path / 'train.npz'))
    mean, std = (0.0,), (1 / 255,)
    torch.manual_seed(0)
    (paper, _), = list(DeviceLoader(ds, 16, mean, std, 32, torch.device('cpu'), kind='mnist', train=True))
    torch.manual_seed(0)
    (elastic, _), = list(DeviceLoader(ds, 16, mean, std, 32, torch.device('cpu'), kind='mnist', train=True,
                                      mnist_aug='elastic'))
    assert not torch.allclose(paper, elastic, atol=1)
    tf = build_transforms('mnist', 32, mean, std, is_training=True, mnist_aug='elastic')
    assert [type(t).__name__ for t in tf.transforms] == ['Resize', 'RandomCrop', 'RandomRotation', 'RandomAffine',
                                                         'ColorJitter', 'ElasticTransform', 'ToTensor', 'Normalize']
