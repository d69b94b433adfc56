"""TITN: Transformer-in-Transformer with a distillation token (paper §3.2, Figure 2).

The outer sequence is ``[cls, dist, patch_1 .. patch_N]``; each block runs an :class:`InnerBlock` over the
pixel tokens of every patch, then an :class:`OuterBlock` that adds the patch residual and attends over the
outer sequence. The head follows DeiT's contract (``set_distilled_training``), so timm's own token
distillation works unchanged. File layout follows timm: blocks, model, ``default_cfgs``,
``checkpoint_filter_fn``, one ``@register_model`` function per variant.
"""
from typing import List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, clean_state_dict, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .constants import (CIFAR10_LABELS, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_LABELS, CIFAR100_MEAN, CIFAR100_STD,
                        HUB_NAMESPACE, MNIST_LABELS, MNIST_MEAN, MNIST_STD)
from .hub import PretrainedWeightsError, explain_load_error
from .layers import InnerBlock, OuterBlock, PixelEmbed, PixelToPatch, classifier_pair, distilled_logits

__all__ = ['TITN', 'Block']


class Block(nn.Module):
    """One TITN block: inner block on the pixel tokens, then the outer block with the patch residual."""

    def __init__(
            self,
            dim: int,
            inner_dim: int,
            num_pixel: int,
            num_heads_outer: int,
            num_heads_inner: int,
            mlp_ratio: float = 4.,
            inner_mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            num_prefix_tokens: int = 2,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        common = dict(qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path,
                      act_layer=act_layer, norm_layer=norm_layer, device=device, dtype=dtype)
        self.inner = InnerBlock(inner_dim, num_heads_inner, mlp_ratio=inner_mlp_ratio, **common)
        self.outer = OuterBlock(
            dim, num_heads_outer, num_pixel=num_pixel, inner_dim=inner_dim, num_prefix_tokens=num_prefix_tokens,
            mlp_ratio=mlp_ratio, **common)

    def _forward(self, pixel_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pixel_tokens = self.inner(pixel_tokens)
        return pixel_tokens, self.outer(patch_tokens, pixel_tokens)

    def forward(self, pixel_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting():  # TITN.set_grad_checkpointing
            return checkpoint(self._forward, pixel_tokens, patch_tokens)
        return self._forward(pixel_tokens, patch_tokens)


class TITN(nn.Module):
    """Transformer-in-Transformer Network with a DeiT-style distillation token (§3.2)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: Union[int, Tuple[int, int]] = 8,
            pixel_size: Union[int, Tuple[int, int]] = 2,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            inner_dim: int = 12,
            depth: int = 12,
            num_heads_outer: int = 3,
            num_heads_inner: int = 2,
            mlp_ratio: float = 4.,
            inner_mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if global_pool not in ('token', ''):
            raise ValueError(f"TITN classifies from its class and distillation tokens: global_pool must be 'token' "
                             f"(or '', as DeiT), got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 2
        self.grad_checkpointing = False
        self.distilled_training = False  # set True (and train mode) to return (cls_logits, dist_logits)

        self.pixel_embed = PixelEmbed(img_size, patch_size, pixel_size, in_chans, inner_dim, **dd)
        num_patches, num_pixel = self.pixel_embed.num_patches, self.pixel_embed.num_pixel
        self.patch_embed = PixelToPatch(num_pixel, inner_dim, embed_dim, norm_layer=norm_layer, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, inner_dim, num_pixel, num_heads_outer, num_heads_inner, mlp_ratio=mlp_ratio,
                inner_mlp_ratio=inner_mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], num_prefix_tokens=self.num_prefix_tokens,
                act_layer=act_layer, norm_layer=norm_layer, **dd)
            for i in range(depth)])
        reduction = self.pixel_embed.feat_ratio()
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.head_dist = classifier_pair(embed_dim, num_classes, **dd)

        for p in (self.cls_token, self.dist_token, self.patch_pos, self.pixel_embed.pixel_pos):
            trunc_normal_(p, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'cls_token', 'dist_token', 'patch_pos', 'pixel_embed.pixel_pos'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r'^cls_token|^dist_token|^patch_pos|^pixel_embed|^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for blk in self.blocks:
            blk.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT's switch: in train mode, ``forward`` returns ``(cls_logits, dist_logits)``."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, '', 'token'):
            raise ValueError(f"TITN's heads read the class and distillation tokens: global_pool must be 'token' or "
                             f"'' (as DeiT), got {global_pool!r}")
        self.num_classes = num_classes
        self.head, self.head_dist = classifier_pair(self.embed_dim, num_classes, like=self)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image to ``(pixel_tokens (B*N, P, inner_dim), patch_tokens (B, 2 + N, dim))``."""
        B = x.shape[0]
        pixel_tokens = self.pixel_embed(x)
        patch_tokens = torch.cat([
            self.cls_token.expand(B, -1, -1),
            self.dist_token.expand(B, -1, -1),
            self.patch_embed(pixel_tokens, B, self.pixel_embed.num_patches),
        ], dim=1)
        return pixel_tokens, self.pos_drop(patch_tokens + self.patch_pos)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pixel_tokens, patch_tokens = self._embed(x)
        for blk in self.blocks:
            pixel_tokens, patch_tokens = blk(pixel_tokens, patch_tokens)
        return self.norm(patch_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The :class:`DistillationHead` contract, with timm's flat ``head`` / ``head_dist`` names."""
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        return distilled_logits(self.head(x), self.head_dist(x_dist), self.distilled_training and self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ):
        """Features of the selected blocks: NCHW maps of the patch tokens (or NLC), as timm's ViTs."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        pixel_tokens, patch_tokens = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            pixel_tokens, patch_tokens = blk(pixel_tokens, patch_tokens)
            if i in take_indices:
                intermediates.append(self.norm(patch_tokens) if norm else patch_tokens)
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.pixel_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(patch_tokens), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'pixel_embed.proj', 'classifier': ('head', 'head_dist'),
        'paper_name': 'A Transformer-in-Transformer Network Utilizing Knowledge Distillation for Image Recognition',
        'origin_url': 'https://github.com/titn-lib/titn-lib',
        'license': 'apache-2.0',
        **kwargs,
    }


def _small_data_cfg(variant_tag: str, dataset: str, published: bool = True, **kwargs) -> dict:
    """A 32x32 config: trained at 32x32 with no resize, so evaluation is a 1.0 crop. ``published``: weights exist
    on the Hub (``titn-lib/<variant_tag>``); without them the config still carries the dataset's statistics."""
    stats = {
        'cifar10': dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10, label_names=CIFAR10_LABELS,
                        input_size=(3, 32, 32)),
        'cifar100': dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, num_classes=100, label_names=CIFAR100_LABELS,
                         input_size=(3, 32, 32)),
        # MNIST's 28x28 digits are resized to 32x32 (paper §4.1), bilinear
        'mnist': dict(mean=MNIST_MEAN, std=MNIST_STD, num_classes=10, label_names=MNIST_LABELS,
                      input_size=(1, 32, 32), interpolation='bilinear'),
    }[dataset]
    return _cfg(
        hf_hub_id=f'{HUB_NAMESPACE}/{variant_tag}' if published else None,
        crop_pct=1.0, crop_mode='center', interpolation=stats.pop('interpolation', 'bicubic'),
        **stats, **kwargs)


default_cfgs = generate_default_cfgs({
    'titn_tiny_patch8_32.cifar10': _small_data_cfg('titn_tiny_patch8_32.cifar10', 'cifar10'),
    'titn_tiny_patch8_32.mnist': _small_data_cfg('titn_tiny_patch8_32.mnist', 'mnist'),
    # recipes exist for these, weights not yet: configs without a Hub id, as timm keeps untrained variants
    'titn_tiny_patch8_32.cifar100': _small_data_cfg('titn_tiny_patch8_32.cifar100', 'cifar100', published=False),
    'titn_tiny_patch16_32.cifar10': _small_data_cfg('titn_tiny_patch16_32.cifar10', 'cifar10', published=False),
    'titn_tiny_patch16_32.cifar100': _small_data_cfg('titn_tiny_patch16_32.cifar100', 'cifar100', published=False),
    'titn_tiny_patch16_32.mnist': _small_data_cfg('titn_tiny_patch16_32.mnist', 'mnist', published=False),
    'titn_small_patch16_224': _cfg(),
    'titn_base_patch16_224': _cfg(),
})


def checkpoint_weights(checkpoint: dict) -> dict:
    """The model weights of a checkpoint: its ``model`` or ``state_dict`` entry (``titn train``, timm's train.py),
    else the dict itself, with DDP and ``torch.compile`` prefixes removed (timm's ``clean_state_dict``)."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])
    return clean_state_dict(checkpoint)


def checkpoint_filter_fn(state_dict: dict, model: TITN) -> dict:
    """Prepare a TITN state dict for ``model``.

    Accepts a training checkpoint (``{'model': ...}`` / ``{'state_dict': ...}``), removes DDP and ``torch.compile``
    prefixes (timm's ``clean_state_dict``) and resamples ``patch_pos`` to the model's patch grid keeping the two
    prefix rows. A different pixel grid changes the shapes of every patch projection, so it cannot be adapted and
    is refused with an explanation. Input-channel adaptation of ``pixel_embed.proj`` is left to timm's loader (the
    configs name it as ``first_conv``).
    """
    out = {}
    for k, v in checkpoint_weights(state_dict).items():
        if k == 'patch_pos' and v.shape != model.patch_pos.shape:
            v = resample_abs_pos_embed(
                v, new_size=model.pixel_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens)
        elif k == 'pixel_embed.pixel_pos' and v.shape != model.pixel_embed.pixel_pos.shape:
            raise ValueError(
                f'these weights have a pixel grid of {tuple(v.shape[-2:])} sub-patches per patch but the model '
                f'{model.pixel_embed.pixel_grid}: the patch projections depend on it, so the weights cannot be '
                f'adapted. Keep patch_size / pixel_size as trained (a new img_size is fine).')
        out[k] = v
    return out


def _filter_pretrained(state_dict: dict, model: TITN) -> dict:
    """:func:`checkpoint_filter_fn` for weights described by the model's pretrained config (the Hub, ``local-dir:``):
    at the config's own input size the patch grid must match, or the weights were trained with another patch size
    (e.g. a ``config.json`` naming another architecture than its ``model.safetensors``)."""
    patches = checkpoint_weights(state_dict)['patch_pos'].shape[1] - model.num_prefix_tokens
    trained_size = tuple(model.pretrained_cfg.get('input_size', (0, 0, 0))[1:])
    if patches != model.pixel_embed.num_patches and trained_size == tuple(model.pixel_embed.img_size):
        raise ValueError(
            f'the weights hold {patches} patches per {trained_size[0]}x{trained_size[1]} image but '
            f'{model.pretrained_cfg.get("architecture")} makes {model.pixel_embed.num_patches}: they were trained with '
            f'another patch size. The architecture named in config.json does not match model.safetensors.')
    return checkpoint_filter_fn(state_dict, model)


def _create_titn(variant: str, pretrained: bool = False, **kwargs) -> TITN:
    out_indices = kwargs.pop('out_indices', 3)
    try:
        return build_model_with_cfg(
            TITN, variant, pretrained,
            pretrained_filter_fn=_filter_pretrained,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs)
    except (RuntimeError, OSError, SafetensorError) as e:  # huggingface_hub's errors derive from OSError
        if not pretrained or isinstance(e, PretrainedWeightsError):
            raise
        raise explain_load_error(variant, kwargs, e) from e


@register_model
def titn_tiny_patch8_32(pretrained: bool = False, **kwargs) -> TITN:
    """The paper's TITN (Table 1): 32x32, patch 8, pixel 2, dims 192/12, depth 12, heads 3/2."""
    model_args = dict(img_size=32, patch_size=8, pixel_size=2, embed_dim=192, inner_dim=12, depth=12,
                      num_heads_outer=3, num_heads_inner=2)
    return _create_titn('titn_tiny_patch8_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def titn_tiny_patch16_32(pretrained: bool = False, **kwargs) -> TITN:
    """The paper's "TITN (Large Patch)" (Table 1): patch 16, pixel 4, otherwise as titn_tiny_patch8_32."""
    model_args = dict(img_size=32, patch_size=16, pixel_size=4, embed_dim=192, inner_dim=12, depth=12,
                      num_heads_outer=3, num_heads_inner=2)
    return _create_titn('titn_tiny_patch16_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def titn_small_patch16_224(pretrained: bool = False, **kwargs) -> TITN:
    """TNT-S dimensions (384/24, heads 6/4) with the distillation token, for ImageNet-sized inputs."""
    model_args = dict(img_size=224, patch_size=16, pixel_size=4, embed_dim=384, inner_dim=24, depth=12,
                      num_heads_outer=6, num_heads_inner=4)
    return _create_titn('titn_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def titn_base_patch16_224(pretrained: bool = False, **kwargs) -> TITN:
    """TNT-B dimensions (640/40, heads 10/4) with the distillation token, for ImageNet-sized inputs."""
    model_args = dict(img_size=224, patch_size=16, pixel_size=4, embed_dim=640, inner_dim=40, depth=12,
                      num_heads_outer=10, num_heads_inner=4)
    return _create_titn('titn_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))
