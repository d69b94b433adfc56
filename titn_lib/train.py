"""``titn train``: train a teacher, or distil a student from one (paper §3.5-3.6, §4.1).

One process per device; several through ``torchrun`` (DDP). Flags follow timm's ``train.py``; a recipe
(``--recipe recipes/<experiment>.yaml``) supplies defaults that the command line overrides.

Every epoch writes ``last.pth`` atomically (temp file + ``os.replace``) with everything needed to continue,
and randomness is re-seeded from ``(seed, epoch)`` at each epoch start, so ``--resume`` after a kill at any
moment repeats the interrupted epoch exactly and ends with the same metrics as an uninterrupted run.
"""
import argparse
import json
import logging
import os
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import data as data_lib
from .evaluate import evaluate
from .loss import TITNDistillLoss
from .modeling import create_model, load_model_state, unwrap

_logger = logging.getLogger('titn.train')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('titn train', description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--recipe', default=None, help='YAML file of defaults (recipes/*.yaml); flags override it')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='titn_tiny_patch8_32', help='any timm model name')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='key=value overrides')
    g.add_argument('--pretrained', action='store_true', help='start from the registered pretrained weights')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (our checkpoint or safetensors)')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate (models that take it)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='mnist', help='mnist, cifar10, cifar100, npz or imagefolder')
    g.add_argument('--data-dir', default='../shared/data', help='root of the data (see titn_lib.data)')
    g.add_argument('--num-classes', type=int, default=None, help='class count (needed for npz/imagefolder)')
    g.add_argument('--download', action='store_true', help="download torchvision's copy when online")
    g.add_argument('--val-split', type=float, default=0.1, help='fraction of train held out for model selection')
    g.add_argument('--train-subset', type=int, default=0, help='use only the first N training images (0: all)')
    g.add_argument('--img-size', type=int, default=32)
    g.add_argument('--aa', default=None, help='AutoAugment policy: cifar10, imagenet, svhn, rand-*, none')
    g.add_argument('--mixup', type=float, default=0.0, help='MixUp alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (the paper: 0.5)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
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
                        'fits, so the schedule equals a run started with that --epochs (needs --warmup-epochs >= 1)')
    g = p.add_argument_group('distillation (§3.5)')
    g.add_argument('--teacher', default='', help='teacher model name (timm), with --teacher-checkpoint')
    g.add_argument('--teacher-checkpoint', default='', help='teacher weights: our .pth, or .safetensors')
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
                        'in bf16 on CPUs with AMX, where the TITN student gains nothing')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the student')
    g.add_argument('--threads', type=int, default=0, help='torch intra-op threads on CPU (0: all cores)')
    g.add_argument('--no-test', action='store_true', help='skip the final test-split evaluation')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = get_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe:
        with open(known.recipe) as f:
            recipe = yaml.safe_load(f) or {}
        valid = {a.dest for a in parser._actions}
        unknown = sorted(set(recipe) - valid)
        if unknown:
            raise ValueError(f'{known.recipe}: unknown recipe keys {unknown}; valid keys are the long flag names '
                             f'with "_" for "-", e.g. batch_size, weight_decay')
        parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves a corrupt ``path``."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def write_metrics(output: str, history: List[Dict]) -> None:
    """``metrics.jsonl``: one line per epoch."""
    _write_text_atomic(os.path.join(output, 'metrics.jsonl'), ''.join(json.dumps(h) + '\n' for h in history))


def write_history(output: str, history: List[Dict]) -> None:
    """``metrics.jsonl`` and ``curves.png`` (loss, top-1/top-5 against epoch)."""
    write_metrics(output, history)
    plot_history(history, os.path.join(output, 'curves.png'))


def plot_history(history: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h['train_loss'] for h in history], label='train')
    val = [h for h in history if 'val_top1' in h]  # the evaluated epochs (--eval-every)
    if val:
        val_epochs = [h['epoch'] for h in val]
        ax_loss.plot(val_epochs, [h['val_loss'] for h in val], label='validation')
        ax_acc.plot(val_epochs, [h['val_top1'] for h in val], label='top-1')
        ax_acc.plot(val_epochs, [h['val_top5'] for h in val], label='top-5')
        if all('val_ema_top1' in h for h in val):
            ax_acc.plot(val_epochs, [h['val_ema_top1'] for h in val], label='top-1, weight average (EMA)')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_distributed(args) -> tuple:
    """``(device, rank, world_size)``; initialises the process group under ``torchrun``."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if world_size > 1:
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    return device, rank, world_size


def build_data(args, info: data_lib.DatasetInfo):
    """``(train_set, val_set, test_set)``: val is carved from train; eval transforms on val and test."""
    train_tf = data_lib.build_transforms(args.dataset, args.img_size, info.mean, info.std, True, aa=args.aa)
    eval_tf = data_lib.build_transforms(args.dataset, args.img_size, info.mean, info.std, False)
    full_train = data_lib.build_dataset(args.dataset, args.data_dir, 'train', train_tf, download=args.download)
    full_val = data_lib.build_dataset(args.dataset, args.data_dir, 'train', eval_tf)
    targets = getattr(full_train, 'targets', None)
    if targets is None:
        raise ValueError(f'{args.dataset}: the dataset exposes no .targets for the validation split')
    train_idx, val_idx = data_lib.train_val_indices(targets, args.val_split, args.seed)
    if args.train_subset:
        train_idx = train_idx[:args.train_subset]
        val_idx = val_idx[:max(1, args.train_subset // 4)]
    test_set = None if args.no_test else data_lib.build_dataset(args.dataset, args.data_dir, 'test', eval_tf)
    val_set = data_lib.subset(full_val, val_idx) if len(val_idx) else None
    return data_lib.subset(full_train, train_idx), val_set, test_set


def dataset_info(args) -> data_lib.DatasetInfo:
    if args.dataset in data_lib.DATASETS:
        info = data_lib.DATASETS[args.dataset]
        return info if args.num_classes in (None, info.num_classes) else data_lib.DatasetInfo(
            args.num_classes, info.in_chans, info.mean, info.std)
    if args.num_classes is None:
        raise ValueError(f'--dataset {args.dataset} needs --num-classes')
    return data_lib.DatasetInfo(args.num_classes, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class AutocastTeacher(nn.Module):
    """``module`` run under bf16 autocast, returning float32 logits (``--teacher-amp``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.module(x).float()


def build_teacher(args, info: data_lib.DatasetInfo, device: torch.device) -> Optional[nn.Module]:
    if not args.teacher:
        return None
    teacher = create_model(args.teacher, num_classes=info.num_classes, in_chans=info.in_chans,
                           img_size=args.img_size, **args.teacher_kwargs)
    if args.teacher_checkpoint:
        load_model_state(teacher, args.teacher_checkpoint, what='teacher')
    teacher_classes = getattr(teacher, 'num_classes', info.num_classes)
    if teacher_classes != info.num_classes:
        raise ValueError(f'the teacher predicts {teacher_classes} classes but {args.dataset} has '
                         f'{info.num_classes}: train or fine-tune a teacher on this dataset first')
    teacher.requires_grad_(False)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()  # the faster layout for conv teachers
    if args.teacher_amp or (args.teacher_amp is None and args.amp):
        teacher = AutocastTeacher(teacher).eval()
    return teacher


def train_one_epoch(model, loader, criterion, optimizer, scheduler, mixup, epoch, steps_per_epoch, device,
                    args, scaler, checkpoint_path, progress, ema=None) -> Dict[str, float]:
    model.train()
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    sums: Dict[str, torch.Tensor] = {}
    seen = 0
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=f'epoch {epoch}', leave=False, mininterval=1 if sys.stderr.isatty() else 30)
    for step, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        # on an accelerator every check waits for the device, so the loss is checked once, at the epoch's end
        if (device.type == 'cpu' or step == steps_per_epoch - 1) and not torch.isfinite(
                loss if device.type == 'cpu' else sums.get('total', loss) + loss):
            raise FloatingPointError(
                f'the loss became non-finite in epoch {epoch + 1} (by step {step + 1}); training stopped and the '
                f'last good checkpoint ({checkpoint_path}) was kept. Lower --lr, add --clip-grad, or check the data.')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(num_updates=epoch * steps_per_epoch + step + 1)
        if ema is not None:
            ema.update(unwrap(model), step=epoch * steps_per_epoch + step + 1)
        n = images.shape[0]
        seen += n
        for k, v in criterion.last_parts.items():  # summed on the device: no wait for it at every step
            sums[k] = sums.get(k, 0.0) + v * n
        if progress:
            loader.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.4g}')
    return {f'train_{"loss" if k == "total" else k}': v.item() / max(seen, 1) for k, v in sums.items()}


def build_loaders(args, info: data_lib.DatasetInfo, train_set, val_set, device, rank: int, world_size: int):
    """``(train_loader_for_epoch, eval_loader)``: ``train_loader_for_epoch(epoch)`` gives that epoch's batches."""
    if args.loader == 'device':
        common = dict(mean=info.mean, std=info.std, img_size=args.img_size, device=device, kind=args.dataset)
        train_loader = data_lib.DeviceLoader(train_set, args.batch_size, train=True, aa=args.aa,
                                             aug_group=args.aug_group, rank=rank, world_size=world_size, **common)
        eval_loader = None if val_set is None else data_lib.DeviceLoader(val_set, max(256, args.batch_size), **common)
        return (lambda epoch: train_loader), eval_loader

    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True) if world_size > 1 else None

    def loader_for_epoch(epoch: int) -> DataLoader:
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        return DataLoader(train_set, batch_size=args.batch_size, drop_last=True, num_workers=args.workers,
                          sampler=sampler or RandomSampler(train_set, generator=generator),
                          generator=generator, persistent_workers=False, pin_memory=device.type == 'cuda')

    eval_loader = None if val_set is None else DataLoader(val_set, batch_size=256, shuffle=False,
                                                          num_workers=args.workers)
    return loader_for_epoch, eval_loader


def fit_epochs_to_budget(args, epochs_done: int, elapsed_s: float, epoch_s: float) -> int:
    """The epoch count that fits ``--time-budget`` minutes: ``epochs_done`` took ``elapsed_s`` (one-off costs such
    as compilation included) and each further epoch takes ``epoch_s``; never above ``--epochs``."""
    fitting = epochs_done + int((args.time_budget * 60 - elapsed_s) // max(epoch_s, 1e-9))
    return max(args.warmup_epochs + 1, min(args.epochs, fitting))


def run(args) -> Dict:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    device, rank, world_size = setup_distributed(args)
    is_main = rank == 0
    if device.type == 'cpu' and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if args.time_budget and args.warmup_epochs < 1:
        raise ValueError('--time-budget picks the epoch count during warm-up, where the learning rate does not '
                         'depend on it: add --warmup-epochs 1 (or more)')
    info = dataset_info(args)
    train_set, val_set, test_set = build_data(args, info)

    seed_everything(args.seed)
    model_kwargs = dict(args.model_kwargs)
    model = create_model(args.model, pretrained=args.pretrained, num_classes=info.num_classes,
                         in_chans=info.in_chans, img_size=args.img_size, drop_path_rate=args.drop_path,
                         **model_kwargs)
    if args.initial_checkpoint:
        load_model_state(model, args.initial_checkpoint, what='initial checkpoint')
    teacher = build_teacher(args, info, device)
    distilling = teacher is not None and args.distillation != 'none'
    if distilling:
        if not hasattr(model, 'set_distilled_training'):
            raise ValueError(f'{args.model} has no distillation token (no set_distilled_training); use a TITN or '
                             f'DeiT-distilled student, or --distillation none')
        model.set_distilled_training(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    fused = dict(fused=True) if device.type == 'cuda' and args.opt in ('adam', 'adamw') else {}  # one kernel
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **fused)
    criterion = TITNDistillLoss(
        teacher, alpha=args.alpha, distillation=args.distillation if distilling else 'none', tau=args.tau,
        label_smoothing=args.smoothing if not (args.mixup or args.cutmix) else 0.0).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == 'float16')
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    steps_per_epoch = len(train_set) // world_size // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'batch size {args.batch_size} exceeds the {len(train_set) // world_size} training images '
                         f'per process')

    def make_scheduler():
        return create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                   step_on_epochs=False, updates_per_epoch=steps_per_epoch)[0]
    scheduler = make_scheduler()
    budget_epoch = min(args.warmup_epochs, 2) if args.time_budget else 0  # the epoch after which it is fixed

    os.makedirs(args.output, exist_ok=True)
    last_path = os.path.join(args.output, 'last.pth')
    best_path = os.path.join(args.output, 'best.pth')
    start_epoch, history, best, best_state = 0, [], None, None
    resume = last_path if args.resume == 'auto' else args.resume
    if resume and os.path.isfile(resume):
        state = torch.load(resume, map_location='cpu', weights_only=True)
        for key in ('model', 'opt', 'dataset'):
            if state['args'][key] != getattr(args, key):
                raise ValueError(f'{resume} was trained with --{key} {state["args"][key]} but this run asks for '
                                 f'--{key} {getattr(args, key)}; resume with the same settings or start a new --output')
        unwrap(model).load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        if state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('model_ema'):
            ema.module.load_state_dict(state['model_ema'])
        start_epoch, history, best = state['epoch'], state['history'], state['best']
        if os.path.isfile(best_path):
            best_state = torch.load(best_path, map_location='cpu', weights_only=True)
        if budget_epoch and start_epoch >= budget_epoch:  # the budget already fixed the epoch count
            args.epochs = state['args']['epochs']
            scheduler = make_scheduler()
        # the schedule is a pure function of the flags and the step, so --epochs may grow on resume
        scheduler.step_update(num_updates=start_epoch * steps_per_epoch)
        if is_main:
            _logger.info(f'resumed from {resume} after epoch {start_epoch}')
    elif args.resume and args.resume != 'auto':
        raise FileNotFoundError(f'--resume {args.resume}: no such checkpoint')
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    mixup = data_lib.build_mixup(args.mixup, args.cutmix, info.num_classes, args.smoothing, args.mixup_prob)
    loader_for_epoch, eval_loader = build_loaders(args, info, train_set, val_set, device, rank, world_size)
    meta = dict(arch=args.model, model_kwargs=model_kwargs, num_classes=info.num_classes, in_chans=info.in_chans,
                img_size=args.img_size, mean=list(info.mean), std=list(info.std), dataset=args.dataset,
                val_split=args.val_split)
    progress = is_main and not args.no_progress
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    saved_best = best_state

    epoch, loop_start = start_epoch, time.time()
    while epoch < args.epochs:
        seed_everything(args.seed * 1000 + epoch)
        start = time.time()
        metrics = train_one_epoch(model, loader_for_epoch(epoch), criterion, optimizer, scheduler, mixup, epoch,
                                  steps_per_epoch, device, args, scaler, last_path, progress, ema)
        record = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]['lr'], epoch_time_s=time.time() - start,
                      **metrics)
        if world_size > 1:
            dist.barrier()
        epoch += 1
        if is_main:
            candidates = {'model': unwrap(model)}
            evaluated = eval_loader is not None and (epoch % args.eval_every == 0 or epoch == args.epochs)
            if evaluated:
                val = evaluate(unwrap(model), eval_loader, info.num_classes, device, amp_dtype)
                record.update({f'val_{k}': v for k, v in val.items() if k != 'n'})
                if ema is not None:
                    val_ema = evaluate(ema.module, eval_loader, info.num_classes, device, amp_dtype)
                    record.update({f'val_ema_{k}': v for k, v in val_ema.items() if k != 'n'})
                    candidates['ema'] = ema.module
            history.append(record)
            # model selection on validation top-1 (model or its average); without a validation split the last
            # epoch is kept
            scores = {name: record.get('val_top1' if name == 'model' else 'val_ema_top1') for name in candidates}
            pick = max(scores, key=lambda name: scores[name] if scores[name] is not None else -1)
            if (evaluated or eval_loader is None) and (scores[pick] is None or best is None or scores[pick] >= best):
                best = scores[pick]
                best_state = dict(model={k: v.detach().to('cpu', copy=True)
                                         for k, v in candidates[pick].state_dict().items()},
                                  epoch=epoch, weights=pick, **meta)
        if epoch == budget_epoch and epoch > start_epoch:  # fixed before saving, so a resume sees the count
            fitted = fit_epochs_to_budget(args, epoch - start_epoch, time.time() - loop_start, time.time() - start)
            if world_size > 1:  # every process takes rank 0's count
                count = torch.tensor([fitted], device=device if device.type == 'cuda' else 'cpu')
                dist.broadcast(count, 0)
                fitted = int(count.item())
            if is_main:
                _logger.info(f'--time-budget {args.time_budget} min: {fitted} epochs fit (epoch {epoch} took '
                             f'{time.time() - start:.1f} s); the run now equals one started with --epochs {fitted}')
            if fitted != args.epochs:
                args.epochs = fitted
                scheduler = make_scheduler()
                scheduler.step_update(num_updates=epoch * steps_per_epoch)
                record['lr'] = optimizer.param_groups[0]['lr']  # the next step's, as in every record
        if is_main:
            if epoch % args.save_every == 0 or epoch == args.epochs:
                if best_state is not saved_best:
                    atomic_save(best_state, best_path)
                    saved_best = best_state
                atomic_save(dict(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), epoch=epoch, history=history, best=best,
                                 model_ema=ema.module.state_dict() if ema is not None else None,
                                 args=vars(args), **meta), last_path)
                write_history(args.output, history)
            else:
                write_metrics(args.output, history)
            _logger.info(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
        if world_size > 1:
            dist.barrier()

    summary = dict(history=history, best_val_top1=best, epochs=args.epochs)
    if is_main and test_set is not None and os.path.isfile(best_path):
        state = torch.load(best_path, map_location='cpu', weights_only=True)
        final = create_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans,
                             img_size=args.img_size, **model_kwargs)
        final.load_state_dict(state['model'])
        test_loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=args.workers)
        summary['test'] = evaluate(final.to(device), test_loader, info.num_classes, device)
        summary['test']['best_epoch'] = state['epoch']
        summary['train_time_s'] = sum(h['epoch_time_s'] for h in history)
        with open(os.path.join(args.output, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        _logger.info(f'test (best validation epoch {state["epoch"]}): ' + json.dumps(
            {k: round(v, 4) for k, v in summary['test'].items()}))
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == '__main__':
    main()
