"""titn-lib: TITN, a Transformer-in-Transformer with knowledge distillation, as a timm model family.

``import titn_lib`` registers the ``titn_*`` models with timm.
"""
from .layers import Attention, DistillationHead, InnerBlock, OuterBlock, PixelEmbed, PixelToPatch
from .loss import TITNDistillLoss
from .titn import TITN, checkpoint_filter_fn
from . import teachers  # noqa: F401  (registers the CNN teachers)

__version__ = '0.1.0'
__all__ = [
    'TITN', 'InnerBlock', 'OuterBlock', 'DistillationHead', 'PixelEmbed', 'PixelToPatch', 'Attention',
    'TITNDistillLoss', 'checkpoint_filter_fn',
]
