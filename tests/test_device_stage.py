"""scripts/device_stage.py: a split packed into WebP sheets comes back bit for bit, or not at all; JPEG sheets come
back close, with the labels exact."""
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, 'scripts', 'device_stage.py')


def _stage(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize('shape,label_dtype', [((2345, 8, 8, 3), np.int64), ((1500, 28, 28), np.uint8)])
def test_pack_unpack_round_trip(tmp_path, shape, label_dtype):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 10, shape[0]).astype(label_dtype)
    os.makedirs(tmp_path / 'data' / 'toy')
    np.savez(tmp_path / 'data' / 'toy' / 'train.npz', images=images, labels=labels)

    r = _stage('pack', '--data-dir', 'data', '--dataset', 'toy', '--parts', '2', '--out', 'stage', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / 'stage' / 'part0') and os.listdir(tmp_path / 'stage' / 'part1')

    r = _stage('unpack', 'stage/part1', 'stage/part0', '--dataset', 'toy', '--out', 'rebuilt', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rebuilt = np.load(tmp_path / 'rebuilt' / 'toy' / 'train.npz')
    np.testing.assert_array_equal(rebuilt['images'], images)
    np.testing.assert_array_equal(rebuilt['labels'], labels)
    assert rebuilt['labels'].dtype == labels.dtype


def test_unpack_refuses_a_missing_part(tmp_path):
    os.makedirs(tmp_path / 'data' / 'toy')
    np.savez(tmp_path / 'data' / 'toy' / 'train.npz', images=np.zeros((2500, 4, 4, 3), np.uint8),
             labels=np.zeros(2500, np.int64))
    assert _stage('pack', '--data-dir', 'data', '--dataset', 'toy', '--out', 'stage', cwd=tmp_path).returncode == 0
    r = _stage('unpack', 'stage/part1', '--dataset', 'toy', '--out', 'rebuilt', cwd=tmp_path)
    assert r.returncode != 0 and 'are all parts staged?' in r.stderr
    assert not os.path.exists(tmp_path / 'rebuilt')


def test_jpeg_sheets_are_close_and_keep_the_labels(tmp_path):
    rng = np.random.default_rng(1)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (1200, 4, 4, 3)), 8, axis=1), 8, axis=2).astype(np.uint8)
    labels = rng.integers(0, 10, 1200)
    os.makedirs(tmp_path / 'data' / 'toy')
    np.savez(tmp_path / 'data' / 'toy' / 'train.npz', images=smooth, labels=labels)
    r = _stage('pack', '--data-dir', 'data', '--dataset', 'toy', '--parts', '1', '--jpeg-quality', '95', '--out',
               'stage', cwd=tmp_path)
    assert r.returncode == 0 and 'PSNR' in r.stdout, r.stderr
    assert all(name.endswith(('.jpg', '.json')) for name in os.listdir(tmp_path / 'stage' / 'part0'))
    r = _stage('unpack', 'stage/part0', '--dataset', 'toy', '--out', 'rebuilt', cwd=tmp_path)
    assert r.returncode == 0 and 'lossy' in r.stdout, r.stderr
    rebuilt = np.load(tmp_path / 'rebuilt' / 'toy' / 'train.npz')
    np.testing.assert_array_equal(rebuilt['labels'], labels)
    assert rebuilt['images'].shape == smooth.shape
    assert np.abs(rebuilt['images'].astype(int) - smooth).mean() < 3
