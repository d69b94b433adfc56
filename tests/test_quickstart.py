"""The main job (scripts/quickstart.sh -> examples/quickstart.py) end to end on a tiny budget, and without data."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED_DATA, needs_shared_data

SCRIPT = os.path.join(REPO_ROOT, 'examples', 'quickstart.py')


@pytest.mark.slow
@needs_shared_data
def test_main_job_on_a_tiny_budget(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, '--data-dir', SHARED_DATA, '--output', str(tmp_path), '--eval-images', '200',
         '--train-images', '64', '--test-images', '40', '--steps', '4', '--eval-every', '2', '--batch-size', '16'],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '| Model | Top-1 (%) |' in result.stdout and 'titn_tiny_patch8_32.cifar10' in result.stdout
    summary = json.loads((tmp_path / 'quickstart.json').read_text())
    student, teacher = summary['cifar10']
    assert student['n'] == teacher['n'] == 200 and teacher['top1'] > 80 and student['top1'] > 40
    for curve in summary['finetune'].values():
        assert [step for step, _ in curve] == [0, 2, 4]
    for picture in ('cifar10_predictions.png', 'finetune_curves.png'):
        assert (tmp_path / picture).read_bytes()[:4] == b'\x89PNG'


def test_main_job_without_data_or_network(tmp_path):
    blocked = dict(os.environ, http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                   HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
    result = subprocess.run([sys.executable, SCRIPT, '--data-dir', str(tmp_path / 'empty'), '--output',
                             str(tmp_path / 'out')], capture_output=True, text=True, cwd=REPO_ROOT, env=blocked,
                            timeout=300)
    assert result.returncode == 1
    message = [line for line in result.stderr.splitlines() if line.startswith('quickstart:')]
    assert len(message) == 1 and 'could not be downloaded' in message[0] and '--data-dir' in message[0]
    assert 'Traceback' not in result.stderr
