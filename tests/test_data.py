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
