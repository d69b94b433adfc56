"""Creating and loading models for training and evaluation: timm names, optional keywords, small-input
adaptation of ImageNet CNN teachers, and safe checkpoint loading (``weights_only=True`` or safetensors)."""
import os

import timm
import torch
import torch.nn as nn

from .titn import checkpoint_filter_fn

__all__ = ['create_model', 'adapt_to_small_input', 'load_state_file', 'load_model_state', 'unwrap']

# keywords a model may not take: dropped (in this order) when its constructor refuses them
_OPTIONAL_KWARGS = ('img_size', 'drop_path_rate')


def adapt_to_small_input(model: nn.Module) -> nn.Module:
    """The usual CIFAR adaptation of ImageNet ResNets: a 3x3 stride-1 stem and no max-pool, so that a 32x32
    image keeps a 4x4 map before pooling instead of 1x1. Models without a ResNet stem are returned as they are."""
    conv1, maxpool = getattr(model, 'conv1', None), getattr(model, 'maxpool', None)
    if isinstance(conv1, nn.Conv2d) and isinstance(maxpool, nn.MaxPool2d) and conv1.stride != (1, 1):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


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


def load_state_file(path: str) -> dict:
    """A state dict from ``.safetensors`` or a pickle checkpoint read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def load_model_state(model: nn.Module, path: str, what: str = 'checkpoint', strict: bool = True) -> None:
    """Load ``path`` into ``model`` with a clear error when architecture or class count differ."""
    state = load_state_file(path)
    state = checkpoint_filter_fn(state, model) if hasattr(model, 'patch_pos') else {
        k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        classes = getattr(model, 'num_classes', None)
        raise ValueError(
            f'the {what} {path} does not fit {type(model).__name__} with {classes} classes: it was saved from '
            f'another architecture or class count. Build the model it was trained as (same --model, '
            f'--num-classes), or load it with --pretrained-style adaptation.\n{e}') from e
