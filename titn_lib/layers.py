"""Building blocks of TITN (paper §3.2, Figures 1-2), each usable on its own.

* :class:`PixelEmbed` cuts an image into ``p x p`` patches and each patch into ``m x m`` pixel-level
  sub-patches, embedded to the inner dimension with a pixel positional embedding.
* :class:`InnerBlock` is a pre-norm transformer block over the pixel tokens of every patch.
* :class:`OuterBlock` adds the "patch residual" (the flattened, projected pixel tokens of each patch,
  zero for the prefix rows) to the patch tokens, then runs a pre-norm transformer block over
  ``[cls, dist, patches]``.
* :class:`DistillationHead` is the DeiT-style pair of classifiers on the class and distillation tokens.
"""
from typing import Optional, Tuple, Type, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_device_dtype, register_notrace_function, to_2tuple, use_fused_attn

__all__ = ['PixelEmbed', 'Attention', 'InnerBlock', 'OuterBlock', 'PixelToPatch', 'DistillationHead', 'classifier_pair',
           'distilled_logits']


def _check_divides(small: Tuple[int, int], big: Tuple[int, int], small_name: str, big_name: str) -> None:
    if min(small) < 1:
        raise ValueError(f'{small_name} must be a positive number of pixels, got {small}')
    if big[0] % small[0] or big[1] % small[1]:
        raise ValueError(f'{small_name} {small} must divide {big_name} {big}; choose a {small_name} that divides it.')


@register_notrace_function  # a leaf for torch.fx (timm's feature extraction), which cannot branch on shapes
def check_image_batch(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """Raise a ``ValueError`` naming the expected and the given input shape."""
    if x.ndim != 4 or x.shape[1] != in_chans or tuple(x.shape[2:]) != tuple(img_size):
        expected = f'(B, {in_chans}, {img_size[0]}, {img_size[1]})'
        raise ValueError(
            f'expected an image batch of shape {expected}, got {tuple(x.shape)}; resize the input, or build '
            f'the model with img_size=/in_chans= matching it (pretrained weights are adapted when loading).')


torch.fx.wrap('check_image_batch')  # the same for plain torch.fx / torchvision's create_feature_extractor


class PixelEmbed(nn.Module):
    """Image to pixel-level tokens (§3.2): ``(B, C, H, W) -> (B * N, P, inner_dim)``.

    Each ``p x p`` patch is embedded on its own by a ``7 x 7`` convolution with stride ``m`` (the pixel
    size), as in Transformer-in-Transformer, giving ``P = (p / m)^2`` pixel tokens per patch, to which the
    learnable pixel positional embedding ``pixel_pos`` (shared by all patches) is added.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: Union[int, Tuple[int, int]] = 8,
            pixel_size: Union[int, Tuple[int, int]] = 2,
            in_chans: int = 3,
            inner_dim: int = 12,
            kernel_size: int = 7,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.pixel_size = to_2tuple(pixel_size)
        _check_divides(self.patch_size, self.img_size, 'patch_size', 'img_size')
        _check_divides(self.pixel_size, self.patch_size, 'pixel_size', 'patch_size')
        self.in_chans = in_chans
        self.inner_dim = inner_dim
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pixel_grid = (self.patch_size[0] // self.pixel_size[0], self.patch_size[1] // self.pixel_size[1])
        self.num_pixel = self.pixel_grid[0] * self.pixel_grid[1]
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size, stride=self.pixel_size, padding=kernel_size // 2, **dd)
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, *self.pixel_grid, **dd))

    def feat_ratio(self, as_scalar: bool = True) -> Union[Tuple[int, int], int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
                check_image_batch(x, self.in_chans, self.img_size)
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        # (B, C, gh*ph, gw*pw) -> (B*gh*gw, C, ph, pw): a reshape/permute, cheaper than nn.Unfold
        x = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, ph, pw)
        x = self.proj(x) + self.pixel_pos
        return x.flatten(2).transpose(1, 2)  # (B*N, P, inner_dim)


class Attention(nn.Module):
    """Multi-head self-attention (§3.1.1, Eq. 1-3) through ``F.scaled_dot_product_attention``.

    ``fused_attn=False`` selects the explicit ``softmax(q k^T / sqrt(d)) v`` reference path.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()  # timm's switch: timm.layers.set_fused_attn(False) selects the reference
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # q, k, v as strided (B, heads, N, head_dim) views of the qkv output, not a permuted copy: SDPA takes
        # strides, and the backward of unbind(2) writes the gradient straight into the qkv layout (no extra
        # permute + cat; ~15% off this module's forward+backward for TITN's inner sizes, see docs/performance.md)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(2)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class _PreNormBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (Eq. 4-6)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)


class InnerBlock(_PreNormBlock):
    """Inner transformer block (Figure 1, left): attention + MLP over the ``P`` pixel tokens of each patch.

    Input and output: ``(B * N, P, inner_dim)``. Every patch is an independent sequence, so the block is
    an ordinary pre-norm transformer block and can be stacked on any ``(batch, tokens, dim)`` tensor.
    """


class OuterBlock(_PreNormBlock):
    """Outer transformer block (Figure 1, right) with the patch residual of §3.2.

    ``forward(patch_tokens, pixel_tokens)``: the pixel tokens of each patch ``(B * N, P, inner_dim)`` are
    flattened, layer-normed, projected to ``dim`` and normed again (the patch residual), added to the
    patch rows of ``patch_tokens`` ``(B, num_prefix_tokens + N, dim)`` (the prefix rows, class and
    distillation token, get zero), and a pre-norm transformer block runs over the whole sequence.
    With ``num_pixel=0`` there is no patch residual and the block is a plain ViT block.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_pixel: int = 0,
            inner_dim: int = 0,
            num_prefix_tokens: int = 2,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
            **kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, norm_layer=norm_layer, **dd, **kwargs)
        self.num_prefix_tokens = num_prefix_tokens
        self.pixel_proj = PixelToPatch(num_pixel, inner_dim, dim, bias=False, norm_layer=norm_layer, **dd) \
            if num_pixel > 0 else None

    def forward(self, patch_tokens: torch.Tensor, pixel_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if pixel_tokens is not None and self.pixel_proj is not None:
            B, L, _ = patch_tokens.shape
            residual = self.pixel_proj(pixel_tokens, B, L - self.num_prefix_tokens)
            # zero rows for [cls, dist]: one padded add instead of slicing and concatenating
            patch_tokens = patch_tokens + F.pad(residual, (0, 0, self.num_prefix_tokens, 0))
        return self.forward_tokens(patch_tokens)


class PixelToPatch(nn.Module):
    """``(B * N, P, inner_dim) -> (B, N, dim)``: the pixel tokens of each patch flattened into one vector,
    layer-normed, projected to the outer dimension and normed again (TNT's patch projection, §3.2)."""

    def __init__(
            self,
            num_pixel: int,
            inner_dim: int,
            dim: int,
            bias: bool = True,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1_proj = norm_layer(num_pixel * inner_dim, **dd)
        self.proj = nn.Linear(num_pixel * inner_dim, dim, bias=bias, **dd)
        self.norm2_proj = norm_layer(dim, **dd)

    def forward(self, pixel_tokens: torch.Tensor, batch_size: int, num_patches: Optional[int] = None) -> torch.Tensor:
        """``num_patches``: patches per image (default: inferred, which an empty batch cannot do)."""
        if num_patches is None:
            num_patches = pixel_tokens.shape[0] // batch_size
        x = pixel_tokens.reshape(batch_size, num_patches, pixel_tokens.shape[1] * pixel_tokens.shape[2])
        return self.norm2_proj(self.proj(self.norm1_proj(x)))


def classifier_pair(in_features: int, num_classes: int, like: Optional[nn.Module] = None, device=None,
                    dtype=None) -> Tuple[nn.Module, nn.Module]:
    """``(head, head_dist)``: two fresh linear classifiers (identities when ``num_classes == 0``).

    ``like``: a module whose parameters' device and dtype the new layers take (unless given), and whose train/eval
    mode.
    """
    if num_classes < 0:
        raise ValueError(f'num_classes must be 0 (features out) or more, got {num_classes}')
    dd = get_device_dtype(like, device, dtype) if like is not None else {'device': device, 'dtype': dtype}
    pair = tuple(nn.Linear(in_features, num_classes, **dd) if num_classes > 0 else nn.Identity() for _ in range(2))
    if like is not None:
        for layer in pair:
            layer.train(like.training)
    return pair


def distilled_logits(cls_logits: torch.Tensor, dist_logits: torch.Tensor, distilled_training: bool):
    """DeiT's head contract (§3.2, §3.6): ``(cls_logits, dist_logits)`` in distilled training, for the hybrid loss;
    otherwise (inference, plain fine-tuning) the average of the two classifiers."""
    if distilled_training and not torch.jit.is_scripting():
        return cls_logits, dist_logits
    return (cls_logits + dist_logits) / 2


class DistillationHead(nn.Module):
    """Classifiers on the class token (row 0) and the distillation token (row 1) (§3.2, §3.6).

    ``forward(tokens)`` takes ``(B, L, dim)`` tokens, e.g. the normalised output of any backbone that
    carries a class and a distillation token. With ``set_distilled_training(True)`` and train mode it returns
    ``(cls_logits, dist_logits)``; otherwise the average of the two, as timm's ``VisionTransformerDistilled``.
    """

    def __init__(self, in_features: int, num_classes: int, drop: float = 0., device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(drop)
        self.head, self.head_dist = classifier_pair(in_features, num_classes, device=device, dtype=dtype)
        self.distilled_training = False

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset(self, num_classes: int) -> None:
        """Rebuild both classifiers for ``num_classes`` (0: identity, features out)."""
        self.num_classes = num_classes
        self.head, self.head_dist = classifier_pair(self.in_features, num_classes, like=self)

    def forward(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x, x_dist = self.head_drop(tokens[:, 0]), self.head_drop(tokens[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        return distilled_logits(self.head(x), self.head_dist(x_dist), self.distilled_training and self.training)
