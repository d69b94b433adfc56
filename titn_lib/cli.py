"""The ``titn`` command: ``titn train``, ``titn eval``, ``titn export`` (argument parsing only)."""
import argparse
import json
import sys
from typing import List, Optional


def _eval(argv: List[str]) -> None:
    from .evaluate import run_eval
    p = argparse.ArgumentParser('titn eval', description='Evaluate checkpoints or timm models on a test split, '
                                'in the layout of the paper\'s Tables 3-5.')
    p.add_argument('models', nargs='+', help='titn train checkpoints (.pth) or timm names (hf-hub:, local-dir:)')
    p.add_argument('--dataset', default='mnist')
    p.add_argument('--data-dir', default='../shared/data')
    p.add_argument('-b', '--batch-size', type=int, default=256)
    p.add_argument('--workers', '-j', type=int, default=2)
    p.add_argument('--device', default='')
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    p.add_argument('--tta', action='store_true',
                   help='also report top-1/top-5 with horizontal-flip test-time augmentation (beside single view)')
    a = p.parse_args(argv)
    run_eval(a.models, a.dataset, a.data_dir, a.batch_size, a.workers, a.device, a.json, flip_tta=a.tta)


def _export(argv: List[str]) -> None:
    from .hub import export_checkpoint
    p = argparse.ArgumentParser('titn export', description='Write a Hub-layout folder (model.safetensors, '
                                'config.json, README.md) from a titn train checkpoint.')
    p.add_argument('checkpoint')
    p.add_argument('--tag', required=True, help='pretrained tag, e.g. mnist, cifar10')
    p.add_argument('--output', default='weights')
    p.add_argument('--metrics', default=None, help='JSON written by titn eval --json (first row is used)')
    p.add_argument('--train-command', default='', help='the exact training command, for the model card')
    p.add_argument('--hardware', default='', help='what it was trained on, e.g. "2 CPU cores (AMD EPYC)"')
    p.add_argument('--notes', default='', help='extra Markdown for the model card')
    a = p.parse_args(argv)
    metrics = {}
    if a.metrics:
        with open(a.metrics) as f:
            rows = json.load(f)
        metrics = rows[0] if isinstance(rows, list) else rows
    if a.hardware:
        metrics['hardware'] = a.hardware
    print(export_checkpoint(a.checkpoint, a.output, a.tag, metrics, a.train_command, a.notes))


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {'train': None, 'eval': _eval, 'export': _export}
    if not argv or argv[0] not in commands:
        print('usage: titn {train,eval,export} ...  (titn <command> --help for its options)', file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == 'train':
        from .train import main as train_main
        train_main(rest)
    else:
        commands[command](rest)


if __name__ == '__main__':
    main()
