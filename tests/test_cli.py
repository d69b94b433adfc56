"""The titn console script: train -> eval (paper table + JSON) -> export (Hub folder) on tiny data."""
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, make_npz_split
from titn_lib.cli import main
from titn_lib.evaluate import classification_metrics, format_table
import torch


def train_eval_export(tiny_npz, tmp_path, capsys):
    """Train under the tagged name users write, evaluate, export; returns the Hub folder."""
    out = tmp_path / 'run'
    main(['train', '--model', 'titn_tiny_patch8_32.cifar10', '--dataset', 'npz', '--num-classes', '3',
          '--data-dir', str(tiny_npz), '--output', str(out), '--workers', '0', '-b', '16', '--epochs', '1',
          '--model-kwargs', 'depth=1', '--opt', 'adamw', '--lr', '1e-3', '--no-progress'])
    capsys.readouterr()
    assert torch.load(out / 'best.pth', weights_only=False)['arch'] == 'titn_tiny_patch8_32'  # the tag is the export's
    main(['eval', str(out / 'best.pth'), '--dataset', 'npz', '--data-dir', str(tiny_npz), '--workers', '0',
          '--json', str(tmp_path / 'eval.json'), '--tta'])
    table = capsys.readouterr().out
    assert '| Model | Top-1 (%) | Top-5 (%) | Precision | Recall | F1-Score | GMACs/img | Params (M) | img/s |' in table
    rows = json.loads((tmp_path / 'eval.json').read_text())
    assert rows[0]['n'] == 60 and rows[0]['params_m'] > 0 and rows[0]['gmacs'] > 0 and rows[0]['img_s'] > 0
    assert f"with flip test-time augmentation top-1 {rows[0]['top1_tta']:.2f}" in table  # beside, not instead
    main(['export', str(out / 'best.pth'), '--tag', 'cifar10', '--output', str(tmp_path / 'weights'),
          '--metrics', str(tmp_path / 'eval.json'), '--train-command', 'titn train --dataset npz'])
    folder = tmp_path / 'weights' / 'titn_tiny_patch8_32.cifar10'
    assert {p.name for p in folder.iterdir()} == {'model.safetensors', 'config.json', 'README.md', 'curves.png'}
    card = (folder / 'README.md').read_text()
    assert 'titn train --dataset npz' in card and f"{rows[0]['top1']:.2f}" in card
    assert '](curves.png)' in card and (folder / 'curves.png').read_bytes() == (out / 'curves.png').read_bytes()
    return folder


def test_train_eval_export(tiny_npz, tmp_path, capsys):
    train_eval_export(tiny_npz, tmp_path, capsys)


def test_fine_tune_published_folder_on_other_channels_and_classes(tiny_npz, tmp_path, capsys):
    """--pretrained from a Hub folder onto 1-channel, 2-class data: timm adapts the first layer and the classifier,
    and the run exports under the new tag."""
    folder = train_eval_export(tiny_npz, tmp_path / 'source', capsys)
    gray = tmp_path / 'gray'
    gray.mkdir()
    for split, n, seed in (('train', 40, 0), ('test', 20, 1)):
        make_npz_split(gray / f'{split}.npz', n, num_classes=2, channels=1, seed=seed)
    out = tmp_path / 'run'
    main(['train', '--model', f'local-dir:{folder}', '--pretrained', '--dataset', 'npz', '--num-classes', '2',
          '--data-dir', str(gray), '--output', str(out), '--workers', '0', '-b', '16', '--epochs', '1',
          '--opt', 'adamw', '--lr', '1e-3', '--no-progress'])
    state = torch.load(out / 'best.pth', weights_only=False)
    assert state['arch'] == 'titn_tiny_patch8_32' and state['model']['pixel_embed.proj.weight'].shape[1] == 1
    assert state['model']['head.weight'].shape[0] == 2
    main(['export', str(out / 'best.pth'), '--tag', 'mnist', '--output', str(tmp_path / 'weights')])
    config = json.loads((tmp_path / 'weights' / 'titn_tiny_patch8_32.mnist' / 'config.json').read_text())
    assert config['model_args']['in_chans'] == 1 and config['num_classes'] == 2


def test_console_script_usage():
    result = subprocess.run([sys.executable, '-m', 'titn_lib.cli'], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and 'usage: titn {train,eval,export}' in result.stderr


def test_metrics_by_hand():
    # 2 classes; true 0 predicted 0 twice, true 1 predicted 0 once and 1 once
    confusion = torch.tensor([[2, 0], [1, 1]])
    m = classification_metrics(confusion, top1_correct=3, top5_correct=4, total=4, loss_sum=2.0)
    assert m['top1'] == 75.0 and m['top5'] == 100.0 and m['loss'] == 0.5
    assert m['precision'] == pytest.approx((2 / 3 + 1) / 2)
    assert m['recall'] == pytest.approx((1 + 0.5) / 2)
    assert m['f1'] == pytest.approx((0.8 + 2 / 3) / 2)
    table = format_table([dict(model='x', top1=1.0)]).splitlines()
    assert len(table) == 3 and table[2] == '| x | 1.00 | - | - | - | - | - | - | - |'


def test_flip_tta_averages_an_image_and_its_mirror():
    from titn_lib.evaluate import evaluate
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 2, 2))
    x = torch.tensor([[[[1., 0.], [0., 0.]]], [[[0., 3.], [0., 0.]]]])
    y = torch.tensor([0, 1])
    with torch.no_grad():
        by_hand = (model(x) + model(x.flip(3))) / 2
    got = evaluate(model, [(x, y)], 2, flip_tta=True)
    expected = torch.nn.functional.cross_entropy(by_hand, y, reduction='sum').item() / 2
    assert got['loss'] == pytest.approx(expected)
    assert got['top1'] == 50.0 * (by_hand.argmax(1) == y).sum().item()
