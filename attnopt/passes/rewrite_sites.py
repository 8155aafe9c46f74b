"""Rewrite sites: matched attention subgraph → one variant op call, output in the original layout.

For each site the pass emits, just before the site's output node:
  canonical q, k, v (replaying the matcher's view recipes, then reshaping to 4-D ``[B, H, L, D]``),
  the combined mask (bool terms and-ed, float terms summed, finite fills kept additive),
  the variant op, and the view ops back to the layout the original value contraction produced.
Then every use of the old output reads the new one; the old nodes become dead (see cleanup).

The same emission builds a small standalone graph per site, so a site can be checked in
isolation on values captured from the original graph (see ``attnopt.verify``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from attnopt._match.graph import dtype, fake, shape
from attnopt._match.layout import Recipe, ops_shape
from attnopt.sites import AttentionSite
from attnopt.variants._base import SiteOperands, Variant, implementation

aten = torch.ops.aten
Lookup = Callable[[Node], Node]


def emit_operands(graph: Graph, site: AttentionSite, lookup: Lookup,
                  state: object = None) -> tuple[SiteOperands, list]:
    """Emit the canonical 4-D operands of ``site`` (q, k, v, mask) into ``graph``.

    Returns them and, for rank > 4 sites, the sizes of the head dims flattened into one.
    """
    g = site.graph
    assert g is not None, "sites from find_attention carry their graph handles"
    r = g.rank
    q, k, v = (_emit_recipe(graph, x, lookup) for x in (g.q, g.k, g.v))
    for recipe, op in g.q_scale:  # tensor-valued / size-dependent scales, folded into q
        s = _emit_recipe(graph, recipe, lookup)
        if isinstance(fake(recipe.node), torch.Tensor) and dtype(recipe.node) != dtype(g.q.node):
            s = graph.call_function(aten.to.dtype, (s, dtype(g.q.node)))
        q = graph.call_function(aten.mul.Tensor if op == "mul" else aten.div.Tensor, (q, s))
    mid_sizes: list = []
    if r > 4:
        mid_sizes = _sizes(graph, q, shape_of=_canonical_shape(site, "q"), dims=range(1, r - 2))
    q, k, v = (_to_4d(graph, t, r) for t in (q, k, v))
    mask = _emit_mask(graph, site, lookup)
    if mask is not None:
        mask = _mask_to_4d(graph, mask, site, r)
    ops = SiteOperands(q=q, k=k, v=v, mask=mask, causal=g.mask.causal, scale=site.scale,
                       state=state, lookup=lookup)
    return ops, mid_sizes


def emit_site(graph: Graph, site: AttentionSite, variant: Variant, lookup: Lookup,
              state: object = None) -> Node:
    """Emit ``variant`` for ``site`` at ``graph``'s insertion point; return the new output node.

    Args:
        graph: the graph to emit into.
        site: a fusable site (its ``graph`` handles refer to the original graph's nodes).
        variant: the variant config to emit.
        lookup: maps an original-graph node to the node standing for it in ``graph``.
        state: what the variant's ``fit`` returned for this site (calibrated variants).
    """
    ops, mid_sizes = emit_operands(graph, site, lookup, state)
    out = implementation(variant).emit(variant, graph, ops, site)
    out = _from_4d(graph, out, site.graph.rank, mid_sizes)
    for op, *args in site.graph.out_ops:
        out = Recipe(out, ((op, *args),)).emit(graph)
    return out


def rewrite_sites(gm: GraphModule, plan: list[tuple[AttentionSite, Variant, object]]) -> None:
    """Rewrite every (site, variant, fitted state) of ``plan`` in ``gm`` (in place), clean up."""
    for site, variant, state in plan:
        old = site.graph.output
        before = set(gm.graph.nodes)
        with gm.graph.inserting_before(old):
            new = emit_site(gm.graph, site, variant, lambda n: n, state)
        new.meta["nn_module_stack"] = old.meta.get("nn_module_stack", {})
        # the attnopt op itself may sit before layout ops (heads folded back, out_ops): stamp it
        # so that exports can pair ONNX nodes with sites
        for n in gm.graph.nodes:
            if n not in before and n.op == "call_function" \
                    and str(n.target).startswith("attnopt."):
                n.meta["attnopt_site"] = site.index
        old.replace_all_uses_with(new)
        for n in site.graph.interior:  # in-place updates of the replaced scores die with them
            if n.op == "call_function" and _writes(n):
                n.meta["attnopt_dead_write"] = True
    from attnopt.passes.cleanup import cleanup

    cleanup(gm)


def site_check_module(
    site: AttentionSite, variant: Variant, state: object = None
) -> tuple[GraphModule, list[Node]]:
    """A standalone module computing ``site`` with ``variant`` from the site's input values.

    Returns the module and the original-graph nodes whose values it takes, in argument order.
    """
    gm, lookup, inputs = _standalone()
    gm.graph.output(emit_site(gm.graph, site, variant, lookup, state))
    gm.recompile()
    return gm, inputs


def site_operands_module(site: AttentionSite) -> tuple[GraphModule, list[Node]]:
    """A standalone module returning the site's canonical ``(q, k, v, mask)``."""
    gm, lookup, inputs = _standalone()
    ops, _ = emit_operands(gm.graph, site, lookup)
    gm.graph.output((ops.q, ops.k, ops.v, ops.mask))
    gm.recompile()
    return gm, inputs


def _standalone():
    """An empty module (variants may register fitted buffers on it) and a lookup that turns
    each original-graph node it is asked for into a placeholder.
    """
    gm = GraphModule(torch.nn.Module(), Graph())
    env: dict[Node, Node] = {}
    inputs: list[Node] = []

    def lookup(n: Node) -> Node:
        if n not in env:
            env[n] = gm.graph.placeholder(f"in_{len(inputs)}")
            inputs.append(n)
        return env[n]

    return gm, lookup, inputs


# -- pieces --------------------------------------------------------------------------------------


def _emit_recipe(graph: Graph, recipe: Recipe, lookup: Lookup) -> Node:
    """Replay ``recipe``; graph nodes among its op arguments (symbolic sizes) are looked up."""
    def arg(a):
        if isinstance(a, Node):
            return lookup(a)
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    ops = tuple((op, *(arg(a) for a in args)) for op, *args in recipe.ops)
    return Recipe(lookup(recipe.node), ops).emit(graph)


def _emit_mask(graph: Graph, site: AttentionSite, lookup: Lookup) -> Node | None:
    """Combine the site's mask terms into one bool (True = attend) or additive float tensor."""
    plan = site.graph.mask
    hard: list[Node] = []
    floats: list[Node] = []
    for t in plan.bool_terms:
        n = _emit_recipe(graph, Recipe(t.node, t.ops), lookup)
        if not t.attend:
            n = graph.call_function(aten.logical_not.default, (n,))
        if t.fill is None:
            hard.append(n)
        else:
            floats.append(graph.call_function(aten.where.Scalar, (n, 0.0, t.fill)))
    for t in plan.float_terms:
        n = _emit_recipe(graph, Recipe(t.node, t.ops), lookup)
        if t.factor != 1.0:
            n = graph.call_function(aten.mul.Tensor, (n, t.factor))
        floats.append(n)
    bool_mask = _fold(graph, hard, aten.logical_and.default)
    if not floats:
        return bool_mask
    if bool_mask is not None:
        floats.append(graph.call_function(aten.where.Scalar, (bool_mask, 0.0, float("-inf"))))
    return _fold(graph, floats, aten.add.Tensor)


def _fold(graph: Graph, nodes: list[Node], op) -> Node | None:
    out = None
    for n in nodes:
        out = n if out is None else graph.call_function(op, (out, n))
    return out


def _canonical_shape(site: AttentionSite, which: str) -> tuple:
    from attnopt._match.matcher import _recipe_shape

    return _recipe_shape(getattr(site.graph, which))


def _sizes(graph: Graph, node: Node, *, shape_of: tuple, dims) -> list:
    """Sizes of ``node`` along ``dims``: ints when static, ``sym_size`` nodes when symbolic."""
    out = []
    for d in dims:
        s = shape_of[d]
        out.append(s if isinstance(s, int) else graph.call_function(aten.sym_size.int, (node, d)))
    return out


def _to_4d(graph: Graph, node: Node, r: int) -> Node:
    if r == 4:
        return node
    if r < 4:
        for _ in range(4 - r):
            node = graph.call_function(aten.unsqueeze.default, (node, 0))
        return node
    return graph.call_function(aten.flatten.using_ints, (node, 1, r - 3))


def _mask_to_4d(graph: Graph, mask: Node, site: AttentionSite, r: int) -> Node:
    """Make a mask that broadcasts to the rank-``r`` scores broadcast to the 4-D scores.

    Up to rank 4 right-aligned broadcasting already does it; above, the middle (head) dims are
    flattened like q's (the matcher only accepts masks of rank <= 2 or of the full rank there).
    """
    if r <= 4:
        return mask
    ranks = [len(ops_shape(shape(t.node), t.ops) or ())
             for t in (*site.graph.mask.bool_terms, *site.graph.mask.float_terms)]
    top = max(ranks, default=0)
    if top <= 2:
        return mask
    for _ in range(r - top):
        mask = graph.call_function(aten.unsqueeze.default, (mask, 0))
    if site.graph.mask_expand is not None:
        mask = graph.call_function(aten.expand.default, (mask, site.graph.mask_expand))
    return graph.call_function(aten.flatten.using_ints, (mask, 1, r - 3))


def _writes(node: Node) -> bool:
    """True for an op that writes into its first argument (``masked_fill_``, ``add_``...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    info = schema.arguments[0].alias_info
    return bool(info is not None and info.is_write)


def _from_4d(graph: Graph, node: Node, r: int, mid_sizes: list) -> Node:
    if r == 4:
        return node
    if r < 4:
        for _ in range(4 - r):
            node = graph.call_function(aten.squeeze.dim, (node, 0))
        return node
    return graph.call_function(aten.unflatten.int, (node, 1, mid_sizes))
