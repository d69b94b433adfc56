"""Cheap, strong CNN teachers for 32x32 inputs, registered with timm.

The paper distils from VGG16_bn (§4.1); any timm model can be a teacher (``titn train --teacher``). These
networks follow the CIFAR-10 speed-record design of Keller Jordan's airbench (conv groups of
conv -> max-pool -> batch-norm -> GELU -> conv -> batch-norm -> GELU, a scaled linear head). At 32x32, VGG16_bn's
convolutional layers hold 14.7M parameters and do 0.31 GMACs per image; ``aircnn_32`` holds 1.97M (about 1/7)
and does 0.12 GMACs (about 3/8), ``aircnn_wide_32`` 4.6M (about 1/3) and 0.31 GMACs (the same).
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .constants import CIFAR10_LABELS, CIFAR10_MEAN, CIFAR10_STD, HUB_NAMESPACE, MNIST_LABELS, MNIST_MEAN, MNIST_STD

__all__ = ['AirCNN', 'adapt_to_small_input']


class ConvGroup(nn.Module):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class AirCNN(nn.Module):
    """airbench-style CNN for 32x32 images: a 2x2 stem, three conv groups, global max-pool, scaled linear.
    :meth:`init_whitening` gives it the airbench method's first layer (Jordan 2024, arXiv 2404.00498)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 10,
            widths: Sequence[int] = (64, 256, 256),
            stem_width: int = 24,
            logit_scale: float = 1 / 9,
            drop_rate: float = 0.,
            global_pool: str = 'max',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if num_classes < 0:
            raise ValueError(f'num_classes must be 0 (features out) or more, got {num_classes}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.logit_scale = logit_scale
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=True, **dd), nn.GELU())
        chs = [stem_width, *widths]
        self.stages = nn.Sequential(*[ConvGroup(chs[i], chs[i + 1], **dd) for i in range(len(widths))])
        self.num_features = self.head_hidden_size = chs[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, bias=False, **dd) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """The airbench method's first layer: the stem's k x k filters become the eigenvectors of the second-moment
        matrix of the k x k patches of ``images`` (normalised training images, [N, C, H, W]), each divided by
        sqrt(eigenvalue + eps) and used with both signs, so that the stem outputs whitened patches before the
        GELU. The filters are then frozen (their bias still learns); filters beyond 2 * C * k * k are zero."""
        conv = self.stem[0]
        chans, kh, kw = conv.weight.shape[1:]
        n = chans * kh * kw
        if conv.out_channels < 2 * n:
            raise ValueError(f'a whitened {kh}x{kw} stem on {chans} channels needs {2 * n} filters, this model has '
                             f'{conv.out_channels}: build it with stem_width={2 * n} or more')
        patches = images.double().unfold(2, kh, 1).unfold(3, kw, 1)  # [N, C, H', W', kh, kw]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, n)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).reshape(n, chans, kh, kw)
        conv.weight.zero_()
        conv.weight[:2 * n] = torch.cat([filters, -filters]).to(conv.weight)
        conv.weight.requires_grad_(False)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False, **get_device_dtype(self)) \
            if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.head(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def adapt_to_small_input(model: nn.Module) -> nn.Module:
    """The usual CIFAR adaptation of ImageNet ResNets: a 3x3 stride-1 stem and no max-pool, so that a 32x32
    image keeps a 4x4 map before pooling instead of 1x1. Models without a ResNet stem are returned as they are."""
    conv1, maxpool = getattr(model, 'conv1', None), getattr(model, 'maxpool', None)
    if isinstance(conv1, nn.Conv2d) and isinstance(maxpool, nn.MaxPool2d) and conv1.stride != (1, 1):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _cfg(variant_tag: Optional[str], dataset: str) -> dict:
    """A 32x32 config; ``variant_tag`` names the published weights on the Hub (``None``: untrained)."""
    stats = {
        'cifar10': dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10, label_names=CIFAR10_LABELS,
                        input_size=(3, 32, 32), interpolation='bicubic'),
        'mnist': dict(mean=MNIST_MEAN, std=MNIST_STD, num_classes=10, label_names=MNIST_LABELS,
                      input_size=(1, 32, 32), interpolation='bilinear'),
    }[dataset]
    return dict(
        hf_hub_id=f'{HUB_NAMESPACE}/{variant_tag}' if variant_tag else None, pool_size=None, crop_pct=1.0,
        crop_mode='center', first_conv='stem.0', classifier='head', license='apache-2.0', **stats)


default_cfgs = generate_default_cfgs({
    'aircnn_32.untrained': _cfg(None, 'cifar10'),
    'aircnn_wide_32.cifar10': _cfg('aircnn_wide_32.cifar10', 'cifar10'),
    'aircnn_small_32.mnist': _cfg('aircnn_small_32.mnist', 'mnist'),
})


@register_model
def aircnn_32(pretrained: bool = False, **kwargs) -> AirCNN:
    """airbench94-sized teacher (widths 64/256/256, about 2M parameters)."""
    return build_model_with_cfg(AirCNN, 'aircnn_32', pretrained, **dict(dict(widths=(64, 256, 256)), **kwargs))


@register_model
def aircnn_wide_32(pretrained: bool = False, **kwargs) -> AirCNN:
    """airbench95's widths (128/384/384, about 4.6M parameters, 0.31 GMACs per image)."""
    return build_model_with_cfg(
        AirCNN, 'aircnn_wide_32', pretrained, **dict(dict(widths=(128, 384, 384), stem_width=32), **kwargs))


@register_model
def aircnn_small_32(pretrained: bool = False, **kwargs) -> AirCNN:
    """A quarter-width teacher (widths 32/64/64) for MNIST-sized problems."""
    return build_model_with_cfg(
        AirCNN, 'aircnn_small_32', pretrained, **dict(dict(widths=(32, 64, 64), stem_width=16), **kwargs))
