"""Attention variants: one module each, registered by config type (see ``_base``)."""

from attnopt.variants import _autograd
from attnopt.variants._base import Variant, implementation, registered
from attnopt.variants.block_topk import BlockTopK
from attnopt.variants.fused import Fused
from attnopt.variants.group_kv import GroupKV
from attnopt.variants.linear import Linear
from attnopt.variants.neighborhood2d import Neighborhood2D
from attnopt.variants.prune_heads import PruneHeads
from attnopt.variants.sliding_window import SlidingWindow
from attnopt.variants.streaming import Streaming
from attnopt.variants.streaming_heads import StreamingHeads

_autograd.register_all()  # every op's backward, for the variants imported above

__all__ = [
    "BlockTopK",
    "Fused",
    "GroupKV",
    "Linear",
    "Neighborhood2D",
    "PruneHeads",
    "SlidingWindow",
    "Streaming",
    "StreamingHeads",
    "Variant",
    "implementation",
    "registered",
]
