"""The README quick start, the 15-line loss example of docs/loss.md and the examples run as written."""
import os
import re
import runpy

import pytest

from conftest import REPO_ROOT


def python_blocks(path):
    with open(os.path.join(REPO_ROOT, path)) as f:
        return re.findall(r'```python\n(.*?)```', f.read(), re.S)


@pytest.mark.parametrize('path', ['README.md', 'docs/loss.md'])
def test_markdown_python_blocks_run(path):
    blocks = python_blocks(path)
    assert blocks
    namespace = {}
    exec(blocks[0], namespace)


def test_reuse_blocks_example(capsys):
    runpy.run_path(os.path.join(REPO_ROOT, 'examples', 'reuse_blocks.py'), run_name='__main__')
    out = capsys.readouterr().out
    assert 'custom TNT, distilled training: torch.Size([4, 10]) torch.Size([4, 10])' in out
    assert 'DistillationHead on DeiT tokens: torch.Size([4, 10])' in out


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO_ROOT, '..', 'shared', 'data', 'mnist', 'test.npz')),
                    reason='../shared/data is not present')
def test_finetune_example_changes_classes_channels_and_size(tmp_path):
    import timm
    import torch
    from titn_lib.hub import export_checkpoint
    source = timm.create_model('titn_tiny_patch8_32', num_classes=10, depth=2)  # a 3-channel, 10-class model
    torch.save(dict(model=source.state_dict(), arch='titn_tiny_patch8_32', model_kwargs=dict(depth=2),
                    num_classes=10, in_chans=3, img_size=32, mean=[0.5] * 3, std=[0.25] * 3, dataset='cifar10'),
               tmp_path / 'c10.pth')
    folder = export_checkpoint(str(tmp_path / 'c10.pth'), str(tmp_path), 'cifar10')
    example = runpy.run_path(os.path.join(REPO_ROOT, 'examples', 'finetune.py'))
    results = example['main']([
        '--weights', f'local-dir:{folder}', '--data-dir', os.path.join(REPO_ROOT, '..', 'shared', 'data'),
        '--num-images', '64', '--test-images', '64', '--steps', '2', '--batch-size', '16', '--img-size', '48'])
    assert set(results) == {'pretrained', 'scratch', 'setup'}
    assert all(0 <= results[k]['top1'] <= 100 for k in ('pretrained', 'scratch'))
