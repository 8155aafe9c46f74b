"""Decode sites: attention site whose k / v are ``cat(past, new)`` → ``attnopt::kv_attention``.

attnopt's matcher finds the attention sites of the captured decoder graph (any spelling, GQA by
``repeat_kv``); here each site is accepted for decode when
  * its canonical k and v are, through full slices and copies, ``cat([past_k, k_new], dim=2)``
    and ``cat([past_v, v_new], dim=2)`` of one layer's past inputs (the cache update), and
  * its mask, *evaluated* on probe inputs (a long past, one left-padded row), equals causal
    attention over absolute positions with the ``attention_mask`` as key padding, possibly
    restricted to a window — the window is read from the mask (the keys the last query sees)
    and then checked on every row, so a model's sliding window is found, not assumed.
Anything else is refused with the reason. The rewrite replaces the site's output by
``kv_attention(q, k_new, v_new, past_k, past_v, attention_mask, window, sinks, scale)`` and the
graph's present outputs by the op's presents; the old cache update, repeat_kv and mask
subgraph become dead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from attnopt._match.graph import IDENTITY_OPS, is_op, normalize_dim, rank
from attnopt._match.matcher import _skip_noop_slices
from attnopt.passes.cleanup import cleanup
from attnopt.passes.rewrite_sites import emit_operands, site_operands_module
from attnopt.sites import AttentionSite
from attnopt.verify import record

from . import (
    _kv_attention,  # noqa: F401 - registers torch.ops.attnopt.kv_attention
    _linear_state,  # noqa: F401 - registers torch.ops.attnopt.linear_state_attention
)

aten = torch.ops.aten
HARD_FILL = -1.0e4


@dataclass
class DecodeSite:
    """A site with its cache update recognised.

    Attributes:
        site: the matcher's site.
        layer: index of the past pair it reads (``past_key_values.{layer}``).
        past_k, past_v, new_k, new_v, cat_k, cat_v: graph nodes of the cache update.
        window: the causal window found in the model's mask (0: none).
        applied_window: the window the export applies (the model's, or a variant's).
        applied_sinks: leading cache slots every query sees besides the window (``Streaming``).
        feature_map: set for a causal ``Linear`` site exported with a recurrent state
            (``_linear_state``): its past pair is then the state ``(S, z)``, not a KV cache.
    """

    site: AttentionSite
    layer: int
    past_k: Node
    past_v: Node
    new_k: Node
    new_v: Node
    cat_k: Node
    cat_v: Node
    window: int = 0
    applied_window: int = 0
    applied_sinks: int = 0
    feature_map: str | None = None


def cache_update(site: AttentionSite, past: list[Node]) -> DecodeSite | str:
    """The site's cache update, or the reason it has none we can lower."""
    if not site.fusable or site.graph is None:
        return f"not fusable: {site.reason}"
    g = site.graph
    if g.rank != 4:
        return f"rank-{g.rank} attention (heads folded into the batch); decode needs [B, H, S, D]"
    if g.k.ops or g.v.ops:
        return "k / v are read through view ops, not straight from the cache"
    parts = []
    for recipe in (g.k, g.v):
        node = _through_copies(recipe.node)
        if not is_op(node, aten.cat.default) or len(node.args[0]) != 2:
            return "k / v do not come from a cache update cat(past, new)"
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if normalize_dim(dim, rank(node) or 4) != 2:
            return "the cache is not concatenated along the sequence dim (2)"
        first, new = node.args[0]
        if first not in past:
            return "the cache update does not start from a past_key_values input"
        parts.append((node, first, new))
    (cat_k, pk, nk), (cat_v, pv, nv) = parts
    ik, iv = past.index(pk), past.index(pv)
    if ik % 2 or iv != ik + 1:
        return "k and v read past inputs that are not one layer's key/value pair"
    return DecodeSite(site, ik // 2, pk, pv, nk, nv, cat_k, cat_v)


def _through_copies(node: Node) -> Node:
    while True:
        nxt = _skip_noop_slices(node)
        if is_op(nxt, *IDENTITY_OPS):
            nxt = nxt.args[0]
        if nxt is node:
            return node
        node = nxt


def read_windows(gm: GraphModule, sites: list[DecodeSite], probe: list, mask: torch.Tensor,
                 queries: int) -> dict[int, str]:
    """Set each site's ``window`` from its mask evaluated on ``probe``; return refusals.

    ``probe`` are flat graph inputs whose ``attention_mask`` (``mask``, ``[B, T]``) has one
    left-padded row; the last ``queries`` positions are the queries.
    """
    from attnopt.export._kv_attention import visible

    modules = {d.site.index: site_operands_module(d.site) for d in sites}
    wanted = {n for _, ins in modules.values() for n in ins}
    values = record(gm, probe, wanted)
    refused: dict[int, str] = {}
    t = mask.shape[1]
    for d in sites:
        module, ins = modules[d.site.index]
        with torch.no_grad():
            m = module(*[values[n] for n in ins])[3]
        if m is None:
            allowed = torch.ones(1, 1, queries, t, dtype=torch.bool)
        else:
            allowed = m if m.dtype == torch.bool else m > HARD_FILL
        if d.site.graph.mask.causal:  # the matcher's causal flag is top-left aligned
            allowed = allowed & torch.ones(queries, t, dtype=torch.bool).tril()
        allowed = allowed.expand(mask.shape[0], -1, queries, t)
        if not bool((allowed == allowed[:, :1]).all()):
            refused[d.site.index] = "the mask differs between heads"
            continue
        allowed = allowed[:, 0]
        seen = int(allowed[0, -1].sum())
        window = 0 if seen == t else seen
        want = visible(mask, queries, window)[:, 0]
        if not torch.equal(allowed, want):
            refused[d.site.index] = ("the mask is not causal attention over the cache with "
                                     "attention_mask as key padding (checked on a probe)")
            continue
        d.window = d.applied_window = window
    return refused


def rewrite(gm: GraphModule, sites: list[DecodeSite], attention_mask: Node) -> None:
    """Replace every site by ``attnopt::kv_attention`` (or, for a site with a ``feature_map``,
    ``attnopt::linear_state_attention`` reading its past pair as the state); presents read the
    op's outputs.
    """
    graph = gm.graph
    for d in sites:
        old = d.site.graph.output
        with graph.inserting_before(old):
            ops, _ = emit_operands(graph, d.site, lambda n: n)
            if d.feature_map:
                call = graph.call_function(
                    torch.ops.attnopt.linear_state_attention.default,
                    (ops.q, d.new_k, d.new_v, d.past_k, d.past_v, attention_mask,
                     float(d.site.scale), d.feature_map))
            else:
                call = graph.call_function(
                    torch.ops.attnopt.kv_attention.default,
                    (ops.q, d.new_k, d.new_v, d.past_k, d.past_v, attention_mask,
                     int(d.applied_window), int(d.applied_sinks), float(d.site.scale)))
            out = graph.call_function(operator.getitem, (call, 0))
            present_k = graph.call_function(operator.getitem, (call, 1))
            present_v = graph.call_function(operator.getitem, (call, 2))
            for op_name, *args in d.site.graph.out_ops:
                from attnopt._match.layout import Recipe

                out = Recipe(out, ((op_name, *args),)).emit(graph)
        call.meta["nn_module_stack"] = old.meta.get("nn_module_stack", {})
        old.replace_all_uses_with(out)
        # Only the graph outputs move to the op's presents: the old cache update's other
        # users (repeat_kv, the replaced scores) come before the op and become dead.
        d.cat_k.replace_all_uses_with(present_k, delete_user_cb=lambda u: u.op == "output")
        d.cat_v.replace_all_uses_with(present_v, delete_user_cb=lambda u: u.op == "output")
    cleanup(gm)
