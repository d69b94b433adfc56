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
