"""Reuse TITN's public blocks outside the TITN class.

1. A small custom Transformer-in-Transformer built from PixelEmbed, InnerBlock, OuterBlock and DistillationHead.
2. A DistillationHead on the tokens of another backbone (timm's DeiT-tiny-distilled), replacing its heads.

Run: python examples/reuse_blocks.py
"""
import timm
import torch
import torch.nn as nn

from titn_lib import DistillationHead, InnerBlock, OuterBlock, PixelEmbed, PixelToPatch


class TinyTNT(nn.Module):
    """Four inner/outer block pairs at 32x32, patch 8, pixel 4, with a class and a distillation token."""

    def __init__(self, num_classes=10, dim=96, inner_dim=16, depth=4):
        super().__init__()
        self.pixel_embed = PixelEmbed(img_size=32, patch_size=8, pixel_size=4, in_chans=3, inner_dim=inner_dim)
        num_pixel = self.pixel_embed.num_pixel
        self.patch_embed = PixelToPatch(num_pixel, inner_dim, dim)
        self.prefix = nn.Parameter(torch.zeros(1, 2, dim))  # [cls, dist]
        self.pos = nn.Parameter(torch.zeros(1, 2 + self.pixel_embed.num_patches, dim))
        self.inner = nn.ModuleList([InnerBlock(inner_dim, num_heads=2) for _ in range(depth)])
        self.outer = nn.ModuleList([OuterBlock(dim, num_heads=3, num_pixel=num_pixel, inner_dim=inner_dim)
                                    for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = DistillationHead(dim, num_classes)

    def forward(self, x):
        pixels = self.pixel_embed(x)
        patches = torch.cat([self.prefix.expand(x.shape[0], -1, -1), self.patch_embed(pixels, x.shape[0])], 1)
        patches = patches + self.pos
        for inner, outer in zip(self.inner, self.outer):
            pixels = inner(pixels)
            patches = outer(patches, pixels)
        return self.head(self.norm(patches))


def main():
    images = torch.randn(4, 3, 32, 32)
    model = TinyTNT()
    print('custom TNT, inference:', model.eval()(images).shape)
    model.head.set_distilled_training(True)
    cls_logits, dist_logits = model.train()(images)
    print('custom TNT, distilled training:', cls_logits.shape, dist_logits.shape)

    deit = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, num_classes=0)
    head = DistillationHead(deit.embed_dim, num_classes=10)
    tokens = deit.forward_features(images)          # (B, 2 + N, 192): cls and dist tokens first
    print('DistillationHead on DeiT tokens:', head.eval()(tokens).shape)


if __name__ == '__main__':
    main()
