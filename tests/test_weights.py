"""The published weights give their model card's test top-1 through the user's path: the registered pretrained
config's transform and `local-dir:` loading (needs ../shared/data)."""
import os
import re

import pytest
from torch.utils.data import DataLoader

from conftest import SHARED_DATA, SHIPPED_FOLDERS, SHIPPED_WEIGHTS, needs_shared_data
from titn_lib.data import build_dataset
from titn_lib.evaluate import evaluate, load_for_eval


@needs_shared_data
@pytest.mark.parametrize('folder', SHIPPED_FOLDERS)
def test_published_top1_is_reproduced(folder):
    with open(os.path.join(SHIPPED_WEIGHTS, folder, 'README.md')) as f:
        published = float(re.search(r'\| top-1 \(%\) \| ([\d.]+) \|', f.read()).group(1))
    model, transform, meta = load_for_eval(f'local-dir:{os.path.join(SHIPPED_WEIGHTS, folder)}')
    test_split = build_dataset(folder.rsplit('.', 1)[1], SHARED_DATA, 'test', transform)
    metrics = evaluate(model, DataLoader(test_split, batch_size=500), meta['num_classes'])
    assert metrics['n'] == 10_000
    assert metrics['top1'] == pytest.approx(published, abs=0.005)
