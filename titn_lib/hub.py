"""Hub-layout export: ``weights/<arch>.<tag>/`` with ``model.safetensors`` and ``config.json`` written by timm's
``save_for_hf`` (so both ``hf-hub:<namespace>/<arch>.<tag>`` and ``local-dir:<folder>`` load it), and a model card.

Upload a folder with one command: ``hf upload <namespace>/<arch>.<tag> weights/<arch>.<tag> .``
"""
import json
import os
import shutil
from typing import Dict, List, Optional

from safetensors import SafetensorError
from timm.models import resolve_pretrained_cfg, save_for_hf

__all__ = ['export_checkpoint', 'model_card', 'PretrainedWeightsError', 'explain_load_error']

# the Hub folders shipped with a source checkout (weights/<arch>.<tag>), for when the Hub cannot be reached
SHIPPED_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights')


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded or loaded; the message names the source and the fix."""


def _weights_source(variant: str, kwargs: dict) -> Optional[str]:
    """Where ``pretrained=True`` looks for the weights of ``variant``; ``None`` when nothing is registered."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.file:
        return f'file {cfg.file}'
    if cfg.hf_hub_id:
        return f'Hub repo {cfg.hf_hub_id}'
    return f'url {cfg.url}' if cfg.url else None


def _shipped_folder(cfg_source: str) -> Optional[str]:
    """The ``weights/<arch>.<tag>`` folder of a source checkout that holds the weights of ``Hub repo <id>``."""
    name = cfg_source.rsplit('/', 1)[-1]
    folder = os.path.join(SHIPPED_WEIGHTS, name)
    return folder if cfg_source.startswith('Hub repo') and os.path.isfile(os.path.join(folder, 'model.safetensors')) \
        else None


def explain_load_error(variant: str, kwargs: dict, error: Exception) -> PretrainedWeightsError:
    """The error a user sees when ``pretrained=True`` fails: the source that was tried and the fix."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    source = _weights_source(variant, kwargs)
    if source is None:
        import timm
        published = timm.list_pretrained(f'{variant}.*') or timm.list_pretrained('titn_*')
        return PretrainedWeightsError(f'no weights are published for {variant} with this tag: use pretrained=False, '
                                      f'or one of the published names: {", ".join(published)}')
    if isinstance(error, RepositoryNotFoundError):
        fix = 'the repo does not exist (or is private): check the name, or log in with `hf auth login`'
    elif isinstance(error, LocalEntryNotFoundError):
        shipped = _shipped_folder(source)
        fix = ('the file is not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set or the '
               'network is down): download it once while online' +
               (f', or load the copy in this checkout: timm.create_model("local-dir:{shipped}", pretrained=True)'
                if shipped else ''))
    elif isinstance(error, EntryNotFoundError):
        fix = 'the repo has no model.safetensors: write one with `titn export` and upload it with `hf upload`'
    elif isinstance(error, SafetensorError):
        fix = ('the downloaded model.safetensors is truncated or corrupt: delete it from the Hub cache '
               '(`hf cache delete`, or the folder under $HF_HOME/hub) and download it again')
    elif 'weights_only' in str(error):
        fix = ('the repo holds a pickle checkpoint with more than tensors; it is refused (weights_only=True) and '
               'was not executed: publish model.safetensors instead')
    elif isinstance(error, RuntimeError) and 'state_dict' in str(error):
        fix = ('the checkpoint was saved from another architecture or class count: use the model name it was '
               'exported for, or pass num_classes= to drop its classifier')
    else:
        fix = 'see the error below'
    return PretrainedWeightsError(
        f'could not load pretrained weights for {variant} from {source}: {fix}.\n{type(error).__name__}: {error}')


CITATION = """@article{titn,
  title = {A Transformer-in-Transformer Network Utilizing Knowledge Distillation for Image Recognition},
}"""


def export_checkpoint(checkpoint: str, output_root: str, tag: str, metrics: Optional[Dict] = None,
                      train_command: str = '', notes: str = '') -> str:
    """Write ``<output_root>/<arch>.<tag>/`` from a ``titn train`` checkpoint; returns the folder."""
    from .modeling import model_from_checkpoint
    model, state = model_from_checkpoint(checkpoint, tag)
    name = f"{state['arch']}.{tag}"
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    metrics_log = os.path.join(run_dir, 'metrics.jsonl')
    if os.path.isfile(metrics_log):
        with open(metrics_log) as f:
            state['history'] = [json.loads(line) for line in f if line.strip()]
    folder = os.path.join(output_root, name)
    save_for_hf(model, folder, safe_serialization=True)
    curves = os.path.join(run_dir, 'curves.png')
    if os.path.isfile(curves):  # the run's loss and accuracy plot, shown by the model card
        shutil.copyfile(curves, os.path.join(folder, 'curves.png'))
        state['curves'] = 'curves.png'
    card = model_card(name, model.pretrained_cfg.get('hf_hub_id', name), state, metrics or {}, train_command, notes)
    with open(os.path.join(folder, 'README.md'), 'w') as f:
        f.write(card)
    return folder


def _history_table(history: List[Dict], max_rows: int = 30) -> str:
    """Validation accuracy against cumulative training time: the evaluated epochs, thinned to about
    ``max_rows`` (the last one always kept)."""
    ema = any('val_ema_top1' in h for h in history)
    lines = ['| epoch | wall time (min, cumulative) | train loss | val top-1 (%) | val top-5 (%) |'
             + (' val top-1, EMA (%) |' if ema else ''), '|---|---|---|---|---|' + ('---|' if ema else '')]
    elapsed, rows = 0.0, []
    for h in history:
        elapsed += h.get('epoch_time_s', 0.0)
        if 'val_top1' in h or h is history[-1]:
            rows.append((h, elapsed))
    stride = max(1, -(-len(rows) // max_rows))
    for i, (h, elapsed) in enumerate(rows):
        if i % stride and i != len(rows) - 1:
            continue
        lines.append(f"| {h['epoch']} | {elapsed / 60:.1f} | {h['train_loss']:.4f} | "
                     f"{h.get('val_top1', float('nan')):.2f} | {h.get('val_top5', float('nan')):.2f} |"
                     + (f" {h.get('val_ema_top1', float('nan')):.2f} |" if ema else ''))
    return '\n'.join(lines)


def model_card(name: str, repo_id: str, state: Dict, metrics: Dict, train_command: str, notes: str) -> str:
    """A Hub model card: metrics, data, training command, wall time, hardware, license and citation."""
    arch = state['arch']
    m = metrics
    metric_rows = '\n'.join([
        '| metric | value |', '|---|---|',
        *(f'| {label} | {m[key]:{fmt}} |' for key, label, fmt in [
            ('top1', 'top-1 (%)', '.2f'), ('top5', 'top-5 (%)', '.2f'), ('precision', 'macro precision', '.4f'),
            ('recall', 'macro recall', '.4f'), ('f1', 'macro F1', '.4f'), ('params_m', 'parameters (M)', '.3f'),
            ('gmacs', 'GMACs per image', '.4f'), ('img_s', f'images/s ({m.get("device", "?")}, batch 128)', '.0f'),
        ] if key in m)])
    history = state.get('history')
    train_time = sum(h.get('epoch_time_s', 0.0) for h in history) / 3600 if history else None
    val_split = state.get('val_split')
    if val_split is None:
        split_note = 'validation split not recorded'
    elif val_split == 0:
        split_note = 'no validation split (the last epoch is kept)'
    else:
        split_note = f'less a class-stratified {val_split:.0%} validation split used for model selection'
    plot = f'![loss and accuracy against epoch]({state["curves"]})\n\n' if state.get('curves') else ''
    curve = f'## Accuracy against training time\n{plot}{_history_table(history)}\n' if history else ''
    return f"""---
library_name: timm
license: apache-2.0
tags: [image-classification, timm, titn-lib]
datasets: [{state['dataset']}]
---
# {name}

`{arch}` trained on {state['dataset']} with `titn train` ([titn-lib](https://github.com/titn-lib/titn-lib)).

```python
import timm, titn_lib
model = timm.create_model("{name}", pretrained=True)   # downloads {repo_id}
```

## Metrics (full {state['dataset']} test split, measured by `titn eval`)
{metric_rows}

## Data
{state['dataset']} train split, {split_note};
input {state['in_chans']}x{state['img_size']}x{state['img_size']},
mean {tuple(state['mean'])}, std {tuple(state['std'])}.
The checkpoint is the epoch with the best validation top-1 (epoch {state.get('epoch', '?')}).

## Training
```
{train_command or '(command not recorded)'}
```
Wall time: {f'{train_time:.2f} h' if train_time is not None else 'see notes'};
hardware: {m.get('hardware', 'see notes')}.

{curve}
{notes}

## License and citation
Apache-2.0. Please cite the paper:
```
{CITATION}
```
"""
