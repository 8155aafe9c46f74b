"""Attention variants: one module each, registered by config type (see ``_base``)."""

from attnopt.variants._base import Variant, implementation, registered
from attnopt.variants.fused import Fused

__all__ = ["Variant", "Fused", "implementation", "registered"]
