"""Sizes a rewrite fixes: site dims a variant's state depends on → capture symbols to keep static.

A variant with per-head parameters (fitted feature-map projections of ``Linear``) holds tensors
sized by the head count and head dim of the example. When those dims are dynamic in the captured
graph (an attention module that receives q, k, v as inputs), verification on inputs of another
size must keep them at their example values; other sizes (batch, length) still change.

A variant implementation declares such dims with an optional method
``static_dims(config, site) -> tuple[str, ...]`` naming canonical dims among ``"heads"``,
``"kv_heads"``, ``"head_dim"`` and ``"value_dim"``.
"""

from __future__ import annotations

from attnopt.sites import AttentionSite
from attnopt.variants._base import Variant, implementation

# canonical operand and dim of each name: q/k/v are [B, H, L, D]
_DIMS = {"heads": ("q", -3), "kv_heads": ("k", -3), "head_dim": ("q", -1),
         "value_dim": ("v", -1)}


def static_symbols(candidates: list[tuple[AttentionSite, Variant]]) -> dict:
    """Symbols (sympy) of the dims each candidate's variant fixes, mapped to why."""
    from attnopt._match.matcher import _recipe_shape

    out: dict = {}
    for site, variant in candidates:
        declare = getattr(implementation(variant), "static_dims", None)
        names = declare(variant, site) if declare is not None else ()
        if not names or site.graph is None:
            continue
        for name in names:
            which, axis = _DIMS[name]
            shp = _recipe_shape(getattr(site.graph, which))
            if not shp or len(shp) < -axis or isinstance(shp[axis], int):
                continue
            why = f"{variant.describe()} at site {site.index} holds state sized by its {name}"
            for sym in shp[axis].node.expr.free_symbols:
                out.setdefault(sym, why)
    return out
