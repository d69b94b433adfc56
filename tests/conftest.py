import os

import pytest
import torch

import titn_lib  # noqa: F401  (registers the models)

SHARED_DATA = os.environ.get(
    'TITN_SHARED_DATA', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SHIPPED_WEIGHTS = os.path.join(REPO_ROOT, 'weights')  # the published Hub folders, <arch>.<tag>
SHIPPED_FOLDERS = sorted(os.listdir(SHIPPED_WEIGHTS)) if os.path.isdir(SHIPPED_WEIGHTS) else []

needs_shared_data = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_DATA, 'mnist', 'test.npz')),
    reason='../shared/data (MNIST/CIFAR-10 .npz) is not present in this checkout')


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts seeded and leaves torch's thread count as it found it (``titn train --threads`` sets it for
    the process; a test that ran one in-process used to leave every later test on one core)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def make_npz_split(path, n, num_classes=3, size=32, channels=3, seed=0):
    """Learnable synthetic images: class c is a bright horizontal band at height c, plus noise."""
    import numpy as np
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    band = size // num_classes
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band] += 150
    if channels == 1:
        images = images[..., 0]
    np.savez_compressed(path, images=images, labels=labels.astype(np.int64))


def _npz_folder(factory, name: str, n_train: int):
    root = factory.mktemp(name)
    make_npz_split(root / 'train.npz', n_train, seed=0)
    make_npz_split(root / 'test.npz', 60, seed=1)
    return root


@pytest.fixture(scope='session')
def tiny_npz(tmp_path_factory):
    """A 3-class ``.npz`` dataset folder (train 120, test 60), 32x32 RGB."""
    return _npz_folder(tmp_path_factory, 'tiny_npz', 120)


@pytest.fixture(scope='session')
def learnable_npz(tmp_path_factory):
    """The same task with enough images (train 600, test 60) for a short run to learn it."""
    return _npz_folder(tmp_path_factory, 'learnable_npz', 600)
