"""``titn train``: train a teacher, or distil a student from one (paper §3.5-3.6, §4.1).

One process per device; several through ``torchrun`` (DDP). Flags follow timm's ``train.py`` (parsed in
:mod:`titn_lib.cli`); a recipe (``--recipe recipes/<experiment>.yaml``) supplies defaults that the command line
overrides. :func:`run` is a sequence of named steps: data, models, optimisation, resume, then epochs
(:func:`train_one_epoch`, validation, checkpoints), then the test split.

Every epoch (every ``--save-every``) writes ``last.pth`` atomically (temp file + ``os.replace``) with everything
needed to continue, and randomness is re-seeded from ``(seed, epoch)`` at each epoch start, so ``--resume`` after a
kill at any moment repeats the interrupted epoch exactly and ends with the same metrics as an uninterrupted run.
"""
import errno
import glob
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.models import get_model_args
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import data as data_lib
from .evaluate import evaluate
from .loss import TITNDistillLoss
from .modeling import create_model, load_model_state, model_from_checkpoint, read_checkpoint, unwrap
from .titn import checkpoint_weights

__all__ = ['run', 'train_one_epoch', 'EpochConfig', 'AutocastTeacher']

_logger = logging.getLogger('titn.train')


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` into a temp file in the same folder, fsync, then rename: a kill never leaves a corrupt
    ``path``, and a full disk leaves the previous ``path`` and no temp file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e) or 'file write failed' in str(e)
        reason = 'no space left on the device' if full else str(e).splitlines()[0]
        raise OSError(errno.ENOSPC if full else getattr(e, 'errno', None) or errno.EIO,
                      f'could not write {path}: {reason}; the previous file, if any, is kept. Free space or choose '
                      f'another --output') from e


def atomic_save(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete the temp files that killed runs left in ``folder`` (those whose process is gone)."""
    removed = []
    for path in glob.glob(os.path.join(folder, '*.tmp[0-9]*')):
        pid = path.rsplit('.tmp', 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            os.remove(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_line(record: Dict) -> str:
    """``record`` as one JSON line with floats at 4 significant digits (a learning rate of 1.45e-4 stays 0.000145
    rather than rounding to 0.0001)."""
    return json.dumps({k: float(f'{v:.4g}') if isinstance(v, float) else v for k, v in record.items()})


def write_metrics(output: str, history: List[Dict]) -> None:
    """``metrics.jsonl``: one line per epoch."""
    text = ''.join(json.dumps(h) + '\n' for h in history).encode()
    _atomic_write(os.path.join(output, 'metrics.jsonl'), lambda f: f.write(text))


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


def setup_distributed(args) -> Tuple[torch.device, int, int]:
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
        torch.backends.cudnn.benchmark = True
    elif args.threads:
        torch.set_num_threads(args.threads)
    return device, rank, world_size


def dataset_info(args) -> data_lib.DatasetInfo:
    """Class count, channels and normalisation of ``--dataset`` (for ``npz``, channels read from the file)."""
    if args.dataset in data_lib.DATASETS:
        info = data_lib.DATASETS[args.dataset]
        return info if args.num_classes in (None, info.num_classes) else data_lib.DatasetInfo(
            args.num_classes, info.in_chans, info.mean, info.std)
    if args.num_classes is None:
        raise ValueError(f'--dataset {args.dataset} needs --num-classes (the number of classes in its labels)')
    in_chans = data_lib.npz_channels(args.data_dir) if args.dataset == 'npz' else 3
    return data_lib.DatasetInfo(args.num_classes, in_chans, *data_lib.default_stats(in_chans))


def build_data(args, info: data_lib.DatasetInfo):
    """``(train_set, val_set, test_set)``: val is carved from train; eval transforms on val and test."""
    train_tf = data_lib.build_transforms(args.dataset, args.img_size, info.mean, info.std, True, aa=args.aa,
                                         crop_padding=args.crop_padding, re_prob=args.reprob, re_mode=args.remode,
                                         mnist_aug=args.mnist_aug)
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


WHITENING_IMAGES = 5000  # training images behind --whiten-stem's patch statistics, as in airbench


def freeze_batchnorm_scales(model: nn.Module) -> int:
    """Keep every batch-norm scale at its starting value (1 from scratch) so that only the shifts learn, as the
    airbench method does (``--freeze-bn-scale``); returns the number of layers frozen."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    for layer in layers:
        layer.weight.requires_grad_(False)
    return len(layers)


def build_student(args, info: data_lib.DatasetInfo, train_set) -> nn.Module:
    """The model to train: whitened (``--whiten-stem``), its batch-norm scales frozen (``--freeze-bn-scale``: at
    the values ``--initial-checkpoint`` then loads, if given), before the optimiser sees it."""
    model = create_model(args.model, pretrained=args.pretrained, num_classes=info.num_classes,
                         in_chans=info.in_chans, img_size=args.img_size, drop_path_rate=args.drop_path,
                         **args.model_kwargs)
    if args.whiten_stem:
        if not hasattr(model, 'init_whitening'):
            raise ValueError(f'--whiten-stem needs a model with a patch-whitening stem (init_whitening), such as '
                             f'aircnn_wide_32; {args.model} has none: drop --whiten-stem')
        model.init_whitening(data_lib.normalised_images(train_set, WHITENING_IMAGES, info.mean, info.std,
                                                        args.img_size, needed_by='--whiten-stem'))
    if args.freeze_bn_scale and not freeze_batchnorm_scales(model):
        raise ValueError(f'--freeze-bn-scale: {args.model} has no batch-norm layers with a scale; drop the flag')
    if args.initial_checkpoint:
        load_model_state(model, args.initial_checkpoint, what='initial checkpoint')
    return model


class AutocastTeacher(nn.Module):
    """``module`` run under bf16 autocast, returning float32 logits (``--teacher-amp``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.module(x).float()


def build_teacher(args, info: data_lib.DatasetInfo, device: torch.device) -> Optional[nn.Module]:
    """The frozen teacher of ``--teacher`` / ``--teacher-checkpoint``, refusing one without weights unless
    ``--untrained-teacher`` asks for it."""
    name, kwargs = args.teacher, dict(args.teacher_kwargs)
    if args.teacher_checkpoint and not name:
        recorded = read_checkpoint(args.teacher_checkpoint, 'teacher checkpoint')
        if 'arch' not in recorded:
            raise ValueError(f'--teacher-checkpoint {args.teacher_checkpoint} does not record its architecture: '
                             f'add --teacher <model name>')
        name, kwargs = recorded['arch'], {**recorded.get('model_kwargs', {}), **kwargs}
    if not name:
        return None
    published = '.' in name or name.startswith(('hf-hub:', 'local-dir:'))  # a name with weights of its own
    if not (args.teacher_checkpoint or published or args.untrained_teacher):
        raise ValueError(f'--teacher {name} has no weights: add --teacher-checkpoint <.pth or .safetensors>, use a '
                         f'name with published weights (e.g. aircnn_wide_32.cifar10), or --untrained-teacher to '
                         f'distil from random weights on purpose')
    if published and not args.teacher_checkpoint:
        teacher = create_model(name, pretrained=True, in_chans=info.in_chans, **kwargs)
    else:
        teacher = create_model(name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=args.img_size,
                               **kwargs)
        if args.teacher_checkpoint:
            load_model_state(teacher, args.teacher_checkpoint, what='teacher checkpoint')
    teacher_classes = getattr(teacher, 'num_classes', info.num_classes)
    if teacher_classes != info.num_classes:
        raise ValueError(f'the teacher predicts {teacher_classes} classes but {args.dataset} has '
                         f'{info.num_classes}: train or fine-tune a teacher on this dataset first')
    teacher.requires_grad_(False)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()  # the faster layout for conv teachers
    if args.teacher_amp or (args.teacher_amp is None and args.amp):
        if device.type == 'cpu' and not cpu_runs_bf16():
            _logger.warning(f'--teacher-amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 kernels, '
                            'so the bf16 teacher is emulated and slower than in float32: pass --no-teacher-amp')
        teacher = AutocastTeacher(teacher).eval()
    return teacher


def cpu_runs_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or AMX); elsewhere (AVX2) bf16 is emulated, and a bf16
    teacher made a CIFAR-10 epoch 2.7x slower instead of faster (docs/reproduction.md, "The refit")."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_loaders(args, info: data_lib.DatasetInfo, train_set, val_set, device, rank: int, world_size: int):
    """``(train_loader_for_epoch, eval_loader)``: ``train_loader_for_epoch(epoch)`` gives that epoch's batches."""
    if args.loader == 'device':
        common = dict(mean=info.mean, std=info.std, img_size=args.img_size, device=device, kind=args.dataset)
        train_loader = data_lib.DeviceLoader(train_set, args.batch_size, train=True, aa=args.aa,
                                             aug_group=args.aug_group, crop_padding=args.crop_padding,
                                             re_prob=args.reprob, re_mode=args.remode, mnist_aug=args.mnist_aug,
                                             rank=rank, world_size=world_size, **common)
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


def prepare_output(folder: str) -> None:
    """Create ``folder``, prove it writable before any training, and delete temp files of killed runs."""
    try:
        os.makedirs(folder, exist_ok=True)
        _atomic_write(os.path.join(folder, '.write-test'), lambda f: f.write(b'ok'))
        os.remove(os.path.join(folder, '.write-test'))
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0]
        raise OSError(e.errno, f'--output {folder} is not writable ({reason}): choose another folder') from e
    for path in remove_stale_temp_files(folder):
        _logger.info(f'removed {path}, left by a run that was killed while saving')


@dataclass
class EpochConfig:
    """What :func:`train_one_epoch` needs besides the model, the data and the optimiser."""
    steps: int  # optimiser steps per epoch
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    clip_grad: Optional[float] = None
    progress: bool = False
    checkpoint_path: str = ''  # named when the loss becomes non-finite


def train_one_epoch(model, loader, criterion, optimizer, scheduler, epoch: int, cfg: EpochConfig, scaler=None,
                    mixup=None, ema=None) -> Dict[str, float]:
    """One pass over ``loader`` (0-based ``epoch``); returns the mean of each part of the loss."""
    model.train()
    device = next(unwrap(model).parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    sums: Dict[str, torch.Tensor] = {}
    seen = 0
    if cfg.progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=f'epoch {epoch + 1}', leave=False, mininterval=1 if sys.stderr.isatty() else 30)
    for step, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None):
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        # on an accelerator every check waits for the device, so the loss is checked once, at the epoch's end
        if (device.type == 'cpu' or step == cfg.steps - 1) and not torch.isfinite(
                loss if device.type == 'cpu' else sums.get('total', loss) + loss):
            kept = (f'the last good checkpoint ({cfg.checkpoint_path}) was kept'
                    if os.path.isfile(cfg.checkpoint_path) else 'no checkpoint had been written yet')
            raise FloatingPointError(f'the loss became non-finite in epoch {epoch + 1} (by step {step + 1}); training '
                                     f'stopped and {kept}. Lower --lr, add --clip-grad, or check the data.')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(num_updates=epoch * cfg.steps + step + 1)
        if ema is not None:
            ema.update(unwrap(model), step=epoch * cfg.steps + step + 1)
        n = images.shape[0]
        seen += n
        for k, v in criterion.last_parts.items():  # summed on the device: no wait for it at every step
            sums[k] = sums.get(k, 0.0) + v * n
        if cfg.progress:
            loader.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.4g}')
    return {f'train_{"loss" if k == "total" else k}': v.item() / max(seen, 1) for k, v in sums.items()}


def fit_epochs_to_budget(args, epochs_done: int, elapsed_s: float, epoch_s: float) -> int:
    """The epoch count that fits ``--time-budget`` minutes: ``epochs_done`` took ``elapsed_s`` (one-off costs such
    as compilation included) and each further epoch takes ``epoch_s``; never above ``--epochs``."""
    fitting = epochs_done + int((args.time_budget * 60 - elapsed_s) // max(epoch_s, 1e-9))
    return max(args.warmup_epochs + 1, min(args.epochs, fitting))


class BestCheckpoint:
    """Model selection on validation top-1 among the model and its weight average; without a validation split
    the last epoch is kept. Held in memory and written at the save points."""

    def __init__(self, path: str):
        self.path, self.top1, self.state, self._written = path, None, None, None

    def restore(self) -> None:
        if os.path.isfile(self.path):
            self.state = self._written = read_checkpoint(self.path, 'best checkpoint')

    def offer(self, candidates: Dict[str, nn.Module], scores: Dict[str, Optional[float]], epoch: int,
              meta: Dict) -> None:
        pick = max(scores, key=lambda name: scores[name] if scores[name] is not None else -1)
        if scores[pick] is None or self.top1 is None or scores[pick] >= self.top1:
            self.top1 = scores[pick]
            weights = candidates[pick].state_dict()
            self.state = dict(model={k: v.detach().to('cpu', copy=True) for k, v in weights.items()},
                              epoch=epoch, weights=pick, **meta)

    def save(self) -> None:
        if self.state is not None and self.state is not self._written:
            atomic_save(self.state, self.path)
            self._written = self.state


def resume_training(path: str, args, info: data_lib.DatasetInfo, model, optimizer, scaler, ema) -> Dict:
    """Load a ``last.pth`` into the model, optimiser, scaler and average; returns the checkpoint."""
    state = read_checkpoint(path, 'resume checkpoint')
    if 'optimizer' not in state or 'args' not in state:
        raise ValueError(f'--resume {path} holds weights only (a best.pth or .safetensors), not a training state: '
                         f'resume from the run\'s last.pth, or start a new run from these weights with '
                         f'--initial-checkpoint {path}')
    if state.get('num_classes') != info.num_classes:
        raise ValueError(f'--resume {path} was trained for {state.get("num_classes")} classes but this run has '
                         f'{info.num_classes} ({args.dataset}): resume with the same data, or fine-tune from it with '
                         f'--initial-checkpoint {path} and a new --output')
    for key in ('model', 'opt', 'dataset'):
        if state['args'][key] != getattr(args, key):
            raise ValueError(f'{path} was trained with --{key} {state["args"][key]} but this run asks for '
                             f'--{key} {getattr(args, key)}; resume with the same settings or start a new --output')
    unwrap(model).load_state_dict(checkpoint_weights(state))
    optimizer.load_state_dict(state['optimizer'])
    if state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    if ema is not None:  # a checkpoint from a run without --model-ema starts the average at its weights
        ema.module.load_state_dict(state.get('model_ema') or unwrap(model).state_dict())
    return state


def evaluate_best_on_test(args, info: data_lib.DatasetInfo, test_set, best_path: str, device: torch.device) -> Dict:
    """The selected checkpoint on the test split, once, at the end."""
    final, state = model_from_checkpoint(best_path)
    test_loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=args.workers)
    metrics = evaluate(final.to(device), test_loader, info.num_classes, device)
    metrics['best_epoch'] = state['epoch']
    return metrics


def run(args) -> Dict:
    """Train as ``args`` (:func:`titn_lib.cli.parse_train_args`) say; returns the history and test metrics."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    if args.time_budget and args.warmup_epochs < 1:
        raise ValueError('--time-budget picks the epoch count during warm-up, where the learning rate does not '
                         'depend on it: add --warmup-epochs 1 (or more)')
    if args.mixup_off_epoch and not (args.mixup or args.cutmix):
        raise ValueError(f'--mixup-off-epoch {args.mixup_off_epoch} stops MixUp / CutMix, but neither is on: add '
                         f'--cutmix or --mixup, or drop the flag')
    device, rank, world_size = setup_distributed(args)
    is_main = rank == 0

    # data, models and output folder: everything that can fail is checked before the first epoch
    info = dataset_info(args)
    train_set, val_set, test_set = build_data(args, info)
    seed_everything(args.seed)
    model = build_student(args, info, train_set)
    # what rebuilds it: the bare architecture (no pretrained tag or hub prefix: `titn export --tag` adds its own) and
    # timm's reconstruction arguments (a hub folder's config.json included), less those recorded on their own
    arch = model.pretrained_cfg.get('architecture', args.model)
    model_kwargs = {k: v for k, v in get_model_args(model).items() if k not in ('num_classes', 'in_chans', 'img_size')}
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
    if is_main:
        prepare_output(args.output)
    last_path = os.path.join(args.output, 'last.pth')
    best = BestCheckpoint(os.path.join(args.output, 'best.pth'))

    # optimisation
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
                         f'per process: lower --batch-size')

    def make_scheduler():
        return create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
                                   step_on_epochs=False, updates_per_epoch=steps_per_epoch)[0]
    scheduler = make_scheduler()
    budget_epoch = min(args.warmup_epochs, 2) if args.time_budget else 0  # the epoch after which it is fixed

    # resume
    start_epoch, history = 0, []
    resume = last_path if args.resume == 'auto' else args.resume
    if resume and (args.resume != 'auto' or os.path.isfile(resume)):
        state = resume_training(resume, args, info, model, optimizer, scaler, ema)
        start_epoch, history, best.top1 = state['epoch'], state['history'], state['best']
        best.restore()
        if budget_epoch and start_epoch >= budget_epoch:  # the budget already fixed the epoch count
            args.epochs = state['args']['epochs']
            args.mixup_off_epoch = state['args'].get('mixup_off_epoch', args.mixup_off_epoch)
            scheduler = make_scheduler()
        # the schedule is a pure function of the flags and the step, so --epochs may grow on resume
        scheduler.step_update(num_updates=start_epoch * steps_per_epoch)
        if is_main:
            _logger.info(f'resumed from {resume} after epoch {start_epoch}')

    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    mixup = data_lib.build_mixup(args.mixup, args.cutmix, info.num_classes, args.smoothing, args.mixup_prob)
    loader_for_epoch, eval_loader = build_loaders(args, info, train_set, val_set, device, rank, world_size)
    meta = dict(arch=arch, model_kwargs=model_kwargs, num_classes=info.num_classes,
                in_chans=info.in_chans, img_size=args.img_size, mean=list(info.mean), std=list(info.std),
                dataset=args.dataset, val_split=args.val_split)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    cfg = EpochConfig(steps=steps_per_epoch, amp_dtype=amp_dtype, channels_last=args.channels_last,
                      clip_grad=args.clip_grad, progress=is_main and not args.no_progress, checkpoint_path=last_path)

    # epochs
    epoch, loop_start = start_epoch, time.time()
    while epoch < args.epochs:
        seed_everything(args.seed * 1000 + epoch)
        if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup.mixup_enabled = False  # whole images (targets still smoothed) from here on, as in timm's train.py
        start = time.time()
        metrics = train_one_epoch(model, loader_for_epoch(epoch), criterion, optimizer, scheduler, epoch, cfg,
                                  scaler, mixup, ema)
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
            if evaluated or eval_loader is None:
                best.offer(candidates, {name: record.get('val_top1' if name == 'model' else 'val_ema_top1')
                                        for name in candidates}, epoch, meta)
        if epoch == budget_epoch and epoch > start_epoch:  # fixed before saving, so a resume sees the count
            fitted = fit_epochs_to_budget(args, epoch - start_epoch, time.time() - loop_start, time.time() - start)
            if world_size > 1:  # every process takes rank 0's count
                count = torch.tensor([fitted], device=device if device.type == 'cuda' else 'cpu')
                dist.broadcast(count, 0)
                fitted = int(count.item())
            if fitted != args.epochs:
                if args.mixup_off_epoch:  # MixUp / CutMix keep their share of the epochs
                    args.mixup_off_epoch = max(epoch + 1, round(args.mixup_off_epoch * fitted / args.epochs))
                args.epochs = fitted
                scheduler = make_scheduler()
                scheduler.step_update(num_updates=epoch * steps_per_epoch)
                record['lr'] = optimizer.param_groups[0]['lr']  # the next step's, as in every record
            if is_main:
                _logger.info(f'--time-budget {args.time_budget} min: {fitted} epochs fit (epoch {epoch} took '
                             f'{time.time() - start:.1f} s); the run now equals one started with --epochs {fitted}'
                             + (f' --mixup-off-epoch {args.mixup_off_epoch}' if args.mixup_off_epoch else ''))
        if is_main:
            if epoch % args.save_every == 0 or epoch == args.epochs:
                best.save()
                atomic_save(dict(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), epoch=epoch, history=history, best=best.top1,
                                 model_ema=ema.module.state_dict() if ema is not None else None,
                                 args=vars(args), **meta), last_path)
                write_history(args.output, history)
            else:
                write_metrics(args.output, history)
            _logger.info(log_line(record))
        if world_size > 1:
            dist.barrier()

    # the test split, once
    summary = dict(history=history, best_val_top1=best.top1, epochs=args.epochs)
    if is_main and test_set is not None and os.path.isfile(best.path):
        summary['test'] = evaluate_best_on_test(args, info, test_set, best.path, device)
        summary['train_time_s'] = sum(h['epoch_time_s'] for h in history)
        with open(os.path.join(args.output, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        _logger.info(f'test (best validation epoch {summary["test"]["best_epoch"]}): {log_line(summary["test"])}')
    if world_size > 1:
        dist.destroy_process_group()
    return summary


if __name__ == '__main__':  # python -m titn_lib.train ... (torchrun)
    from .cli import main
    main(['train', *sys.argv[1:]])
