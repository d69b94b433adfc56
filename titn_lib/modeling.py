"""Creating models for training and evaluation, and the one reader of every checkpoint kind: ``titn train``
checkpoints (``last.pth``, ``best.pth``), safetensors files (Hub folders), and state dicts saved from DDP,
``torch.compile`` or timm's ``train.py`` (``state_dict``, ``model``; wrapper prefixes removed by timm's
``clean_state_dict``). Pickles are read with ``weights_only=True``."""
import os
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn

from .teachers import adapt_to_small_input
from .titn import TITN, checkpoint_filter_fn, checkpoint_weights

__all__ = ['create_model', 'read_checkpoint', 'load_model_state', 'model_from_checkpoint', 'unwrap']

# keywords a model may not take: dropped (in this order) when its constructor refuses them
_OPTIONAL_KWARGS = ('img_size', 'drop_path_rate')


def create_model(name: str, pretrained: bool = False, small_input: bool = True, **kwargs) -> nn.Module:
    """``timm.create_model`` that drops ``img_size`` / ``drop_path_rate`` for models that do not take them and,
    for inputs of at most 64 pixels, adapts ResNet-style stems (:func:`adapt_to_small_input`)."""
    if name not in timm.list_models() and not name.startswith(('hf-hub:', 'local-dir:')) \
            and name.split('.')[0] not in timm.list_models():
        raise ValueError(f'unknown model {name!r}: import titn_lib to register titn_* models; see timm.list_models()')
    img_size = kwargs.get('img_size')
    while True:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
            break
        except TypeError as e:
            refused = next((k for k in _OPTIONAL_KWARGS if k in kwargs and f"'{k}'" in str(e)), None)
            if refused is None:
                raise
            kwargs.pop(refused)
    if small_input and img_size is not None and img_size <= 64 and 'img_size' not in kwargs:
        adapt_to_small_input(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if inner is None:
            return model
        model = inner


def read_checkpoint(path: str, what: str = 'checkpoint') -> dict:
    """The checkpoint at ``path`` as a dict; a safetensors file becomes ``{'model': tensors}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'the {what} {path} does not exist: check the path')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return {'model': load_file(path)}
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle holding more than tensors
        raise ValueError(f'the {what} {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0]}); '
                         f'expected a .pth written by torch.save (titn train) or a .safetensors file') from e
    if not isinstance(state, dict):
        raise ValueError(f'the {what} {path} holds a {type(state).__name__}, not a state dict or checkpoint')
    return state


def load_model_state(model: nn.Module, path: str, what: str = 'checkpoint', strict: bool = True) -> dict:
    """Load the weights at ``path`` into ``model`` (TITN weights through :func:`checkpoint_filter_fn`), with a clear
    error when architecture or class count differ; returns the checkpoint."""
    checkpoint = read_checkpoint(path, what)
    state = checkpoint_weights(checkpoint)
    if isinstance(model, TITN):
        state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        classes = getattr(model, 'num_classes', None)
        raise ValueError(
            f'the {what} {path} does not fit {type(model).__name__} with {classes} classes: it was saved from '
            f'another architecture or class count. Build the model it was trained as (same --model, '
            f'--num-classes).\n{e}') from e
    return checkpoint


def model_from_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[nn.Module, dict]:
    """``(model, checkpoint)`` for a ``titn train`` checkpoint, built from the architecture it records
    (``tag``: build it as ``<arch>.<tag>``, with that pretrained config)."""
    checkpoint = read_checkpoint(path)
    if 'arch' not in checkpoint:
        raise ValueError(f'{path} is not a checkpoint written by titn train (no "arch" entry); for a timm name or '
                         f'a Hub folder pass hf-hub:<repo> or local-dir:<folder>')
    name = f"{checkpoint['arch']}.{tag}" if tag else checkpoint['arch']
    model = create_model(name, num_classes=checkpoint['num_classes'],
                         in_chans=checkpoint['in_chans'], img_size=checkpoint['img_size'],
                         **checkpoint.get('model_kwargs', {}))
    model.load_state_dict(checkpoint_weights(checkpoint))
    return model, checkpoint
