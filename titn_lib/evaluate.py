"""Metrics in the layout of the paper's Tables 3-5: top-1, top-5, macro precision / recall / F1, parameters,
GMACs per image and images/s. ``titn eval`` prints them; the paper's "GFLOPs" column is per batch of 1024
(its 111.40 for TITN is about 0.109 GMACs per image, which is what :func:`gmacs_per_image` reports)."""
import json
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['classification_metrics', 'evaluate', 'gmacs_per_image', 'count_params', 'images_per_second',
           'format_table']


def classification_metrics(confusion: torch.Tensor, top1_correct: int, top5_correct: int, total: int,
                           loss_sum: float) -> Dict[str, float]:
    """Top-1/top-5 (%), macro precision, recall and F1 from a ``[true, predicted]`` confusion matrix."""
    confusion = confusion.double()
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = actual > 0  # macro average over the classes present in the split
    return dict(
        top1=100.0 * top1_correct / max(total, 1), top5=100.0 * top5_correct / max(total, 1),
        precision=precision[present].mean().item(), recall=recall[present].mean().item(),
        f1=f1[present].mean().item(), loss=loss_sum / max(total, 1), n=total)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device = torch.device('cpu'),
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             flip_tta: bool = False) -> Dict[str, float]:
    """Evaluate ``model`` in eval mode on ``loader``; returns :func:`classification_metrics`.

    ``flip_tta``: test-time augmentation, the mean of the logits of each image and its horizontal mirror."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top1 = top5 = total = 0
    loss_sum = 0.0
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc='eval', leave=False)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            if flip_tta:
                logits = (logits + model(images.flip(3))) / 2
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction='sum').item()
        k = min(5, num_classes)
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(targets[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        total += targets.numel()
        confusion += torch.bincount(targets.cpu() * num_classes + topk[:, 0].cpu(),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    model.train(was_training)
    return classification_metrics(confusion, top1, top5, total, loss_sum)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()  # not inference_mode: FlopCounterMode's module tracker hooks need autograd-aware tensors
def gmacs_per_image(model: nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-accumulates of one forward pass for one image, in billions (``torch.utils.flop_counter``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2e9


@torch.inference_mode()
def images_per_second(model: nn.Module, input_size: Sequence[int], batch_size: int = 128, steps: int = 5,
                      warmup: int = 2, amp_dtype: Optional[torch.dtype] = None) -> float:
    """Inference throughput (eval mode, median of ``steps`` timed batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_size, device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return batch_size / sorted(times)[len(times) // 2]


COLUMNS = [('model', 'Model', '{}'), ('top1', 'Top-1 (%)', '{:.2f}'), ('top5', 'Top-5 (%)', '{:.2f}'),
           ('precision', 'Precision', '{:.4f}'), ('recall', 'Recall', '{:.4f}'), ('f1', 'F1-Score', '{:.4f}'),
           ('gmacs', 'GMACs/img', '{:.4f}'), ('params_m', 'Params (M)', '{:.2f}'), ('img_s', 'img/s', '{:.0f}')]


def format_table(rows: List[Dict]) -> str:
    """A Markdown table with the paper's columns."""
    lines = ['| ' + ' | '.join(title for _, title, _ in COLUMNS) + ' |',
             '|' + '---|' * len(COLUMNS)]
    for row in rows:
        lines.append('| ' + ' | '.join(fmt.format(row[key]) if key in row else '-' for key, _, fmt in COLUMNS) + ' |')
    return '\n'.join(lines)


def write_json(path: str, payload) -> None:
    with open(path, 'w') as f:
        json.dump(payload, f, indent=2)


def load_for_eval(spec: str, device: torch.device = torch.device('cpu')):
    """``(model, transform, meta)`` for a checkpoint written by ``titn train`` or a timm name
    (``hf-hub:``/``local-dir:`` included, loaded with its pretrained weights). ``meta['dataset']``: the data it
    was trained on, where it is recorded (a checkpoint's ``dataset``, a pretrained tag)."""
    import os
    import timm
    from timm.data import create_transform, resolve_data_config
    from .data import DATASETS, build_transforms
    from .modeling import model_from_checkpoint

    if os.path.isfile(spec):
        if spec.endswith('.safetensors'):
            raise ValueError(f'{spec} holds weights without their architecture: pass local-dir:'
                             f'{os.path.dirname(spec) or "."} (its Hub folder, with config.json) or a titn train .pth')
        model, state = model_from_checkpoint(spec)
        transform = build_transforms(state['dataset'], state['img_size'], state['mean'], state['std'], False)
        meta = dict(name=f'{state["arch"]} ({os.path.basename(os.path.dirname(os.path.abspath(spec)))})',
                    num_classes=state['num_classes'], input_size=(state['in_chans'], state['img_size'],
                                                                  state['img_size']), dataset=state['dataset'])
    elif spec.endswith(('.pth', '.pt', '.safetensors')) or os.sep in spec and not spec.startswith(
            ('hf-hub:', 'local-dir:')):
        raise FileNotFoundError(f'{spec} does not exist: pass a titn train checkpoint (.pth) that exists, or a timm '
                                f'name (hf-hub:<repo>, local-dir:<folder>)')
    else:
        model = timm.create_model(spec, pretrained=True)
        config = resolve_data_config({}, model=model)
        transform = create_transform(**config)
        tag = model.pretrained_cfg.get('tag')
        meta = dict(name=spec, num_classes=model.num_classes, input_size=config['input_size'],
                    dataset=tag if tag in DATASETS else None)
    return model.to(device).eval(), transform, meta


def _check_fits(meta: Dict, dataset: str) -> None:
    """A clear error when a model's channels or classes do not match the data it is evaluated on."""
    from .data import DATASETS
    info = DATASETS.get(dataset)
    if info is None:
        return
    in_chans = meta['input_size'][0]
    if in_chans != info.in_chans or meta['num_classes'] != info.num_classes:
        raise ValueError(f'{meta["name"]} takes {in_chans}-channel images and predicts {meta["num_classes"]} '
                         f'classes, but {dataset} has {info.in_chans}-channel images and {info.num_classes} classes: '
                         f'evaluate it on the data it was trained on' +
                         (f' (--dataset {meta["dataset"]})' if meta.get('dataset') else ''))


def run_eval(specs: Sequence[str], dataset: Optional[str], data_dir: str, batch_size: int = 256, workers: int = 2,
             device: str = '', json_path: Optional[str] = None, throughput_batch: int = 128,
             flip_tta: bool = False, limit: Optional[int] = None) -> List[Dict]:
    """Evaluate every model on the test split; print the paper-style table; optionally write JSON.

    ``dataset``: ``None`` evaluates each model on the data it records (a checkpoint's, a pretrained tag's).
    ``flip_tta``: also measure top-1 / top-5 with horizontal-flip test-time augmentation (``top1_tta``,
    ``top5_tta``), reported beside the single-view numbers, never instead of them. ``limit``: only the first
    ``limit`` test images (a quick look; reported numbers use the whole split)."""
    from torch.utils.data import DataLoader, Subset
    from .data import build_dataset

    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    rows = []
    for spec in specs:
        model, transform, meta = load_for_eval(spec, dev)
        data = dataset or meta.get('dataset')
        if data is None:
            raise ValueError(f'{spec} does not record the data it was trained on: add --dataset')
        _check_fits(meta, data)
        test_set = build_dataset(data, data_dir, 'test', transform)
        if limit:
            test_set = Subset(test_set, range(min(limit, len(test_set))))
        loader = DataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers)
        row = dict(model=meta['name'], spec=spec, dataset=data)
        row.update(evaluate(model, loader, meta['num_classes'], dev))
        if flip_tta:
            tta = evaluate(model, loader, meta['num_classes'], dev, flip_tta=True)
            row.update(top1_tta=tta['top1'], top5_tta=tta['top5'])
        row.update(params_m=count_params(model) / 1e6, gmacs=gmacs_per_image(model, meta['input_size']),
                   img_s=images_per_second(model, meta['input_size'], batch_size=throughput_batch),
                   device=str(dev))
        rows.append(row)
    print(format_table(rows))
    for row in rows:
        if 'top1_tta' in row:
            print(f"{row['model']}: with flip test-time augmentation top-1 {row['top1_tta']:.2f}, "
                  f"top-5 {row['top5_tta']:.2f} (single view above)")
    if json_path:
        write_json(json_path, rows)
    return rows
