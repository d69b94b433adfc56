"""The ``titn`` command: ``titn train``, ``titn eval``, ``titn export``. Argument parsing and error reporting only;
the work is done by :mod:`titn_lib.train`, :mod:`titn_lib.evaluate` and :mod:`titn_lib.hub`.

Errors print as one line on stderr (what was expected, what was given, what to do) with exit status 1; ``--debug``
(anywhere on the command line, or ``TITN_DEBUG=1``) shows the traceback instead.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

import yaml
from timm.utils import ParseKwargs

__all__ = ['main', 'train_parser', 'parse_train_args']

DEFAULT_DATA_DIR = 'data'  # torchvision's download folder; the scripts pass ../shared/data on this project's machines


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('titn train', description='Train a teacher, or distil a student from one '
                                '(paper §3.5-3.6, §4.1).', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--recipe', default=None, help='YAML file of defaults (recipes/*.yaml); flags override it')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='titn_tiny_patch8_32',
                   help='any timm model name, with or without a pretrained tag, or hf-hub:<repo> / local-dir:<folder>')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='key=value overrides')
    g.add_argument('--pretrained', action='store_true',
                   help="start from the model's pretrained weights, adapted by timm to the data's channel count (first "
                        'layer) and class count (new heads)')
    g.add_argument('--initial-checkpoint', default='',
                   help='start from these weights (our checkpoint or safetensors) of the same architecture, channels '
                        'and classes')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate (models that take it)')
    g.add_argument('--whiten-stem', action='store_true',
                   help="the airbench method's first layer: set the stem to frozen patch-whitening filters computed "
                        'from the first 5000 training images (models with init_whitening: aircnn_*)')
    g.add_argument('--freeze-bn-scale', action='store_true',
                   help='keep every batch-norm scale at its starting value so that only the shifts learn (airbench)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='mnist', help='mnist, cifar10, cifar100, npz or imagefolder')
    g.add_argument('--data-dir', default=DEFAULT_DATA_DIR, help='root of the data (see titn_lib.data)')
    g.add_argument('--num-classes', type=int, default=None, help='class count (needed for npz/imagefolder)')
    g.add_argument('--download', action='store_true', help="download torchvision's copy when online")
    g.add_argument('--val-split', type=float, default=0.1, help='fraction of train held out for model selection')
    g.add_argument('--train-subset', type=int, default=0, help='use only the first N training images (0: all)')
    g.add_argument('--img-size', type=int, default=32)
    g.add_argument('--crop-padding', type=int, default=4,
                   help='random crop of RGB data: zero padding on each side in pixels, i.e. the largest shift')
    g.add_argument('--mnist-aug', default='paper', choices=['paper', 'crop', 'elastic'],
                   help="MNIST training augmentation: the paper's crop, rotation, affine and colour jitter (paper), "
                        "its random crop alone, shifts of up to 2 pixels (crop), or the paper's followed by an "
                        'elastic distortion, not in the paper (elastic)')
    g.add_argument('--aa', default=None, help='AutoAugment policy: cifar10, imagenet, svhn, rand-*, none')
    g.add_argument('--reprob', type=float, default=0.0,
                   help="timm's random erasing: probability per image (not in the paper; 0: off)")
    g.add_argument('--remode', default='pixel', choices=['const', 'rand', 'pixel'],
                   help='random erasing fill: const (zero after normalisation), rand (per channel), pixel')
    g.add_argument('--mixup', type=float, default=0.0, help='MixUp alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (the paper: 0.5)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-off-epoch', type=int, default=0,
                   help="timm's switch: MixUp / CutMix stop after this many epochs, so the last ones see whole "
                        'images (0: never); --time-budget scales it with --epochs')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    g.add_argument('--workers', '-j', type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help='data loader processes (default leaves a core to the model on small machines)')
    g.add_argument('--loader', default='workers', choices=['workers', 'device'],
                   help='workers: DataLoader processes with PIL transforms; device: the whole split on the '
                        'training device, augmented there in batches (in-memory datasets; fastest on a GPU)')
    g.add_argument('--aug-group', type=int, default=32,
                   help='--loader device: images that share one AutoAugment draw')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=10)
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per process')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=int, default=0)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                   help='keep an exponential moving average of the weights (timm ModelEmaV3); the better of '
                        'model and average on validation is kept as best.pth')
    g.add_argument('--model-ema-decay', type=float, default=0.999, help='per optimizer step')
    g.add_argument('--time-budget', type=float, default=0,
                   help='minutes for all epochs: at the end of warm-up epoch 2 (or 1) --epochs is lowered to what '
                        'fits (and --mixup-off-epoch in proportion), so the schedule equals a run started with '
                        'those values (needs --warmup-epochs >= 1)')
    g = p.add_argument_group('distillation (§3.5)')
    g.add_argument('--teacher', default='', help='teacher model name (timm); a tagged name such as '
                   'aircnn_wide_32.cifar10 loads its published weights')
    g.add_argument('--teacher-checkpoint', default='', help='teacher weights: our .pth, or .safetensors')
    g.add_argument('--untrained-teacher', action='store_true',
                   help='distil from a teacher with random weights, on purpose (tests, ablations)')
    g.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--distillation', default='hard', choices=['hard', 'soft', 'none'])
    g.add_argument('--alpha', type=float, default=0.5, help='weight of the distillation term')
    g.add_argument('--tau', type=float, default=1.0)
    g = p.add_argument_group('run')
    g.add_argument('--output', default='output/run', help='folder for checkpoints, metrics and plots')
    g.add_argument('--eval-every', type=int, default=1,
                   help='evaluate on the validation split every N epochs (and after the last)')
    g.add_argument('--save-every', type=int, default=1,
                   help='write last.pth, best.pth and curves.png every N epochs (and after the last)')
    g.add_argument('--resume', default='', help="checkpoint to continue from, or 'auto' for OUTPUT/last.pth")
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--device', default='', help='cpu, cuda, cuda:1 (default: cuda when present)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False, help='mixed precision (GPU)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    g.add_argument('--teacher-amp', action=argparse.BooleanOptionalAction, default=None,
                   help='run the teacher under bf16 autocast (default: as --amp); a CNN teacher runs about 4x faster '
                        'in bf16 on CPUs with AMX, where the TITN student gains nothing, and slower on AVX2-only CPUs')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the student')
    g.add_argument('--threads', type=int, default=0, help='torch intra-op threads on CPU (0: all cores)')
    g.add_argument('--no-test', action='store_true', help='skip the final test-split evaluation')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def parse_train_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``titn train``'s arguments: the recipe's keys as defaults, the command line over them."""
    parser = train_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe:
        if not os.path.isfile(known.recipe):
            raise FileNotFoundError(f'--recipe {known.recipe} does not exist: pass one of recipes/*.yaml')
        with open(known.recipe) as f:
            recipe = yaml.safe_load(f) or {}
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(recipe) - valid)
        if unknown:
            raise ValueError(f'{known.recipe}: unknown recipe keys {unknown}; valid keys are the long flag names '
                             f'with "_" for "-", e.g. batch_size, weight_decay')
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def _train(argv: List[str]) -> None:
    from .train import run
    run(parse_train_args(argv))


def _eval(argv: List[str]) -> None:
    from .evaluate import run_eval
    p = argparse.ArgumentParser('titn eval', description='Evaluate checkpoints or timm models on a test split, '
                                'in the layout of the paper\'s Tables 3-5.')
    p.add_argument('models', nargs='+', help='titn train checkpoints (.pth) or timm names (hf-hub:, local-dir:)')
    p.add_argument('--dataset', default=None,
                   help='mnist, cifar10, cifar100, npz, imagefolder (default: the dataset a checkpoint was trained on)')
    p.add_argument('--data-dir', default=DEFAULT_DATA_DIR)
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


COMMANDS = {'train': _train, 'eval': _eval, 'export': _export}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv or os.environ.get('TITN_DEBUG', '') not in ('', '0')
    argv = [a for a in argv if a != '--debug']
    if not argv or argv[0] not in COMMANDS:
        print('usage: titn {train,eval,export} ... [--debug]  (titn <command> --help for its options)', file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    try:
        COMMANDS[command](rest)
    except (ValueError, OSError, RuntimeError, FloatingPointError, KeyError) as e:
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'titn {command}: error: {message} (--debug shows the traceback)', file=sys.stderr)
        raise SystemExit(1)


if __name__ == '__main__':
    main()
