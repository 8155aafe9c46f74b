"""The semantic attention matcher: softmax-anchored, shape-checked, reason-reporting.

For every softmax over the last dimension it walks
  * backwards through casts, scales (mul/div by constants), additive biases and masks
    (add/sub, masked_fill, where, baddbmm) to the contraction that made the scores
    (matmul, bmm, einsum, baddbmm), and identifies q and k through transposes and permutes;
  * forwards through casts and eval-mode dropout to exactly one contraction with v.
Every ``scaled_dot_product_attention`` call is a site too (already fused; flags kept).
A softmax whose path contains an op it does not understand is never rewritten: it is reported
as rejected (not attention) or as an unfusable site, always with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from attnopt._match.evaluate import Evaluator, scalar_value
from attnopt._match.graph import (
    CAST_OPS,
    IDENTITY_OPS,
    InputDependence,
    dtype,
    hint,
    is_op,
    normalize_dim,
    rank,
    same_size,
    shape,
    value_users,
)
from attnopt._match.layout import EinsumError, Recipe, parse_einsum, to_canonical
from attnopt._match.masks import HARD_FILL, MaskAnalyzer, MaskPlan
from attnopt.sites import AttentionSite, Rejected, SiteGraph

log = logging.getLogger("attnopt.find")
aten = torch.ops.aten

SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
SDPA_OPS = (aten.scaled_dot_product_attention.default,)
CONTRACTION_OPS = (aten.matmul.default, aten.bmm.default, aten.einsum.default,
                   aten.baddbmm.default)
_PASS_OPS = (*CAST_OPS, *IDENTITY_OPS)
_DROPOUT_OPS = (aten.dropout.default,)
_PROJECTION_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


class NotAttention(Exception):
    """Raised inside the matcher when a softmax is not attention."""


class Unfusable(Exception):
    """Raised inside the matcher when attention is found but cannot be rewritten."""

    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.partial = partial or {}


@dataclass
class _Score:
    """Result of walking back from a softmax to the score contraction."""

    contraction: Node
    q: Recipe
    k: Recipe
    scale: float
    plan: MaskPlan
    interior: set[Node] = field(default_factory=set)
    spelling: list[str] = field(default_factory=list)


class Matcher:
    """Finds attention sites in one captured graph.

    Args:
        gm: the captured (unlifted) graph module.
        evaluator: evaluates input-independent subgraphs for the example and alternate sizes.
    """

    def __init__(self, gm: GraphModule, evaluator: Evaluator) -> None:
        self.gm = gm
        self.ev = evaluator
        self.depends = InputDependence(gm.graph)
        self.masks = MaskAnalyzer(evaluator, self.depends)

    def find(self) -> tuple[list[AttentionSite], list[Rejected]]:
        """All sites (fusable or not) and all rejected softmaxes, in graph order."""
        sites: list[AttentionSite] = []
        rejected: list[Rejected] = []
        for node in list(self.gm.graph.nodes):
            if not is_op(node, *SOFTMAX_OPS, *SDPA_OPS):
                continue
            where = _location(node)[0]
            try:
                site = self._match(node, len(sites))
            except NotAttention as e:
                log.debug("softmax %s at %s is not attention: %s", node.name, where, e)
                rejected.append(Rejected(where, str(e)))
                continue
            except Unfusable as e:
                log.debug("attention %s at %s left exact: %s", node.name, where, e)
                site = self._unfusable_site(node, len(sites), str(e), e.partial)
            sites.append(site)
        log.info("found %d attention sites (%d fusable), %d other softmaxes",
                 len(sites), sum(s.fusable for s in sites), len(rejected))
        return sites, rejected

    # -- one site ------------------------------------------------------------------------------

    def _match(self, node: Node, index: int) -> AttentionSite:
        if is_op(node, *SDPA_OPS):
            return self._match_sdpa(node, index)
        return self._match_softmax(node, index)

    def _match_softmax(self, sm: Node, index: int) -> AttentionSite:
        x = sm.args[0]
        r = rank(x)
        if r is None or r < 2:
            raise NotAttention("softmax input is not a matrix")
        if normalize_dim(sm.args[1], r) != r - 1:
            raise NotAttention("softmax is not over the last dimension")
        # Forward first: without a value contraction this is not attention at all.
        value_mm, v, out_ops, fwd_interior, fwd_spelling = self._walk_forward(sm)
        score = self._walk_back(x)
        lq, lk = shape(x)[-2], shape(x)[-1]
        self._check_shapes(score, v, lq, lk)
        spelling = score.spelling + [_softmax_spelling(sm)] + fwd_spelling
        interior = score.interior | fwd_interior | {sm, value_mm}
        graph = SiteGraph(
            anchor=sm, output=value_mm, q=score.q, k=score.k, v=v, out_ops=out_ops, rank=r,
            mask=score.plan, interior=interior,
        )
        self._peel_gqa(graph)
        self._check_rank(graph)
        return self._site(index, sm, graph, score.scale, "->".join(spelling), already_fused=False)

    def _match_sdpa(self, node: Node, index: int) -> AttentionSite:
        args = list(node.args) + [None] * (8 - len(node.args))
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = args[:8]
        kw = node.kwargs
        mask = kw.get("attn_mask", mask)
        dropout_p = kw.get("dropout_p", dropout_p) or 0.0
        is_causal = bool(kw.get("is_causal", is_causal) or False)
        scale = kw.get("scale", scale)
        enable_gqa = bool(kw.get("enable_gqa", enable_gqa) or False)
        if dropout_p:
            raise Unfusable(f"SDPA with dropout_p={dropout_p} (training mode)")
        r = rank(q)
        if r is None or r < 2:
            raise Unfusable("SDPA operands of unknown rank")
        if scale is None:
            d = shape(q)[-1]
            if not isinstance(d, int):
                raise Unfusable("symbolic head dim with the default scale")
            scale = 1.0 / math.sqrt(d)
        plan = MaskPlan(causal=is_causal)
        if isinstance(mask, Node):
            if dtype(mask) == torch.bool:
                self.masks.add_bool(plan, mask, attend=True, fill=None)
            else:
                self.masks.add_float(plan, mask, 1.0)
        graph = SiteGraph(
            anchor=node, output=node, q=Recipe(q), k=Recipe(k), v=Recipe(v), out_ops=(), rank=r,
            mask=plan, interior={node},
        )
        if not enable_gqa:
            self._peel_gqa(graph)
        self._check_rank(graph)
        flags = "causal" if is_causal else ""
        return self._site(index, node, graph, float(scale), f"sdpa({flags})".replace("()", ""),
                          already_fused=True)

    # -- backwards: scores ---------------------------------------------------------------------

    def _walk_back(self, x: Node) -> _Score:
        """Peel casts, scales and mask terms from the softmax input down to the contraction."""
        factor = 1.0
        plan = MaskPlan()
        interior: set[Node] = set()
        spelling: list[str] = []
        while True:
            if not isinstance(x, Node):
                raise NotAttention("softmax input does not come from a tensor op")
            interior.add(x)
            if is_op(x, *_PASS_OPS):
                x = x.args[0]
                continue
            if is_op(x, *CONTRACTION_OPS):
                break
            nxt = self._peel_one(x, factor, plan, spelling)
            if nxt is None:
                if self._contraction_near(x):
                    raise Unfusable(f"unsupported op {_op_name(x)} on the score path")
                raise NotAttention(f"scores come from {_op_name(x)}, not from a contraction")
            x, factor = nxt
        return self._contraction(x, factor, plan, interior, spelling)

    def _peel_one(
        self, x: Node, factor: float, plan: MaskPlan, spelling: list[str]
    ) -> tuple[Node, float] | None:
        """Peel one scale / bias / mask op; return the score-side input and the new factor."""
        if is_op(x, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = x.args[:2]
            side, c = self._scaled_operand(a, b, commutes=is_op(x, aten.mul.Tensor,
                                                                aten.mul.Scalar))
            if side is None or c is None or c <= 0:
                return None
            if is_op(x, aten.div.Tensor, aten.div.Scalar):
                c = 1.0 / c
            spelling.append("scale")
            return side, factor * c
        if is_op(x, aten.add.Tensor, aten.sub.Tensor):
            a, b = x.args[:2]
            alpha = x.kwargs.get("alpha", 1)
            if not isinstance(a, Node) or not isinstance(b, Node) or alpha != 1:
                return None
            if self._reaches_contraction(a):
                side, other, sign = a, b, 1.0
            elif is_op(x, aten.add.Tensor) and self._reaches_contraction(b):
                side, other, sign = b, a, 1.0
            else:
                return None
            if is_op(x, aten.sub.Tensor):
                sign = -1.0
            if dtype(other) == torch.bool or not dtype(other) or not dtype(other).is_floating_point:
                return None
            self.masks.add_float(plan, other, factor * sign)
            spelling.append("add")
            return side, factor
        if is_op(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            base, cond, val = x.args[:3]
            fill = self._hard_fill(val)
            if fill is None or dtype(cond) != torch.bool:
                return None
            self.masks.add_bool(plan, cond, attend=False, fill=_finite(fill * factor))
            spelling.append("masked_fill")
            return base, factor
        if is_op(x, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cond, a, b = x.args[:3]
            if dtype(cond) != torch.bool:
                return None
            if isinstance(a, Node) and self._reaches_contraction(a):
                fill, side, attend = self._hard_fill(b), a, True
            elif isinstance(b, Node) and self._reaches_contraction(b):
                fill, side, attend = self._hard_fill(a), b, False
            else:
                return None
            if fill is None:
                return None
            self.masks.add_bool(plan, cond, attend=attend, fill=_finite(fill * factor))
            spelling.append("where")
            return side, factor
        return None

    def _contraction(
        self, mm: Node, factor: float, plan: MaskPlan, interior: set[Node], spelling: list[str]
    ) -> _Score:
        """Identify q and k of the score contraction ``mm`` (matmul / bmm / einsum / baddbmm)."""
        if is_op(mm, aten.einsum.default):
            q, k = self._einsum_qk(mm)
            spelling.append("einsum")
        else:
            if is_op(mm, aten.baddbmm.default):
                bias, a, b = mm.args[:3]
                beta = mm.kwargs.get("beta", 1)
                alpha = mm.kwargs.get("alpha", 1)
                if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
                    raise Unfusable("baddbmm with non-constant beta/alpha")
                if beta != 0:
                    self.masks.add_float(plan, bias, factor * beta)
                factor *= alpha
                spelling.append("baddbmm")
            else:
                a, b = mm.args[:2]
                spelling.append("matmul" if is_op(mm, aten.matmul.default) else "bmm")
            if (rank(a) or 0) < 2 or (rank(b) or 0) < 2:
                raise NotAttention("contraction with a vector")
            q, k = Recipe(a), _key_from_transposed(b)
        q, factor = self._peel_scale(q, factor)
        k, factor = self._peel_scale(k, factor)
        spelling.reverse()
        return _Score(mm, q, k, factor, plan, interior | {mm}, spelling)

    def _einsum_qk(self, mm: Node) -> tuple[Recipe, Recipe]:
        eq, operands = mm.args[:2]
        if len(operands) != 2:
            raise NotAttention("einsum with other than two operands")
        a, b = operands
        try:
            (la, lb), out = parse_einsum(eq, [rank(a), rank(b)])
        except EinsumError as e:
            raise NotAttention(str(e)) from e
        if len(out) < 2:
            raise NotAttention(f"einsum {eq!r} does not produce a score matrix")
        row, col = out[-2], out[-1]
        if row in lb and col in la:
            a, b, la, lb = b, a, lb, la
        contracted = (set(la) & set(lb)) - set(out)
        batch = out[:-2]
        if (
            len(contracted) != 1
            or row not in la or row in lb or col not in lb or col in la
            or set(la) - set(batch) - {row} != contracted
            or set(lb) - set(batch) - {col} != contracted
        ):
            raise NotAttention(f"einsum {eq!r} is not a q.k contraction")
        d = contracted.pop()
        return to_canonical(la, batch, row, d, a), to_canonical(lb, batch, col, d, b)

    def _peel_scale(self, r: Recipe, factor: float) -> tuple[Recipe, float]:
        """Fold scalar mul/div applied to q or k (before any view) into the factor."""
        node = r.node
        while is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = node.args[:2]
            side, c = self._scaled_operand(a, b, commutes=is_op(node, aten.mul.Tensor,
                                                                   aten.mul.Scalar))
            if side is None or c is None or c <= 0:
                break
            factor *= (1.0 / c) if is_op(node, aten.div.Tensor, aten.div.Scalar) else c
            node = side
        return Recipe(node, r.ops), factor

    def _scaled_operand(self, a: Any, b: Any, *,
                        commutes: bool) -> tuple[Node | None, float | None]:
        """For ``a*b`` or ``a/b``: (the tensor operand, the scalar constant) or (None, None)."""
        cb = self._scalar(b)
        if isinstance(a, Node) and cb is not None and (rank(a) or 0) >= 2:
            return a, cb
        if commutes:
            ca = self._scalar(a)
            if isinstance(b, Node) and ca is not None and (rank(b) or 0) >= 2:
                return b, ca
        return None, None

    def _scalar(self, arg: Any) -> float | None:
        if isinstance(arg, Node):
            if self.depends(arg):
                return None
            s = shape(arg)
            if s is not None and any(not isinstance(d, int) or d != 1 for d in s):
                return None
        return scalar_value(self.ev, arg)

    def _hard_fill(self, arg: Any) -> float | None:
        v = self._scalar(arg)
        if v is None or v > HARD_FILL:
            return None
        return v

    def _reaches_contraction(self, node: Node, depth: int = 12) -> bool:
        """True when ``node`` leads back to a contraction through score-path ops only."""
        for _ in range(depth):
            if is_op(node, *CONTRACTION_OPS):
                return True
            if is_op(node, *_PASS_OPS, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                node = node.args[0]
            elif is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
                side, _ = self._scaled_operand(*node.args[:2], commutes=is_op(
                    node, aten.mul.Tensor, aten.mul.Scalar))
                if side is None:
                    return False
                node = side
            elif is_op(node, aten.add.Tensor, aten.sub.Tensor):
                return any(isinstance(a, Node) and self._reaches_contraction(a, depth - 1)
                           for a in node.args[:2])
            elif is_op(node, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
                return any(isinstance(a, Node) and self._reaches_contraction(a, depth - 1)
                           for a in node.args[1:3])
            else:
                return False
            if not isinstance(node, Node):
                return False
        return False

    def _contraction_near(self, x: Node, depth: int = 6) -> bool:
        """True when a contraction of two activations lies a few elementwise ops above ``x``."""
        frontier = [x]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for a in n.all_input_nodes:
                    if is_op(a, *CONTRACTION_OPS):
                        return True
                    if a.op == "call_function" and rank(a) == rank(x):
                        nxt.append(a)
            frontier = nxt
        return False

    # -- forwards: values ----------------------------------------------------------------------

    def _walk_forward(self, sm: Node):
        """Follow the probabilities to the value contraction; return it, v and the out layout."""
        p = sm
        interior: set[Node] = set()
        spelling: list[str] = []
        while True:
            users = value_users(p)
            if not users:
                raise NotAttention("softmax result is not used by another op")
            if len(users) > 1:
                if any(self._leads_to_value_contraction(u, p) for u in users):
                    raise Unfusable("the attention probabilities have another use (returned "
                                    "attention weights? output_attentions / need_weights)")
                raise NotAttention(
                    "softmax result is used by several ops, none a value contraction")
            u = users[0]
            if is_op(u, *_PASS_OPS):
                interior.add(u)
                p = u
                continue
            if is_op(u, *_DROPOUT_OPS):
                prob, train = u.args[1], u.args[2] if len(u.args) > 2 else True
                if train and prob:
                    raise Unfusable(f"dropout(p={prob}) is active: the model is in training mode")
                interior.add(u)
                spelling.append("dropout(eval)")
                p = u
                continue
            if is_op(u, aten.matmul.default, aten.bmm.default) and u.args[0] is p:
                v = u.args[1]
                if (rank(v) or 0) < 2:
                    raise NotAttention("softmax result contracted with a vector")
                r = rank(sm)
                rv = rank(v)
                recipe = Recipe(v)
                for _ in range(r - rv):
                    recipe = recipe.then("unsqueeze", 0)
                spelling.append("matmul" if is_op(u, aten.matmul.default) else "bmm")
                return u, recipe, (), interior, spelling
            if is_op(u, aten.einsum.default):
                v, out_ops = self._einsum_value(u, p, rank(sm))
                spelling.append("einsum")
                return u, v, out_ops, interior, spelling
            raise NotAttention(f"softmax result goes to {_op_name(u)}, not to a value contraction")

    def _leads_to_value_contraction(self, u: Node, p: Node, depth: int = 4) -> bool:
        for _ in range(depth):
            if is_op(u, aten.matmul.default, aten.bmm.default) and u.args[0] is p:
                return True
            if is_op(u, aten.einsum.default) and p in u.args[1]:
                return True
            if is_op(u, *_PASS_OPS, *_DROPOUT_OPS) and len(value_users(u)) == 1:
                p, u = u, value_users(u)[0]
                continue
            return False
        return False

    def _einsum_value(self, mm: Node, p: Node, r: int) -> tuple[Recipe, tuple]:
        eq, operands = mm.args[:2]
        if len(operands) != 2 or p not in operands:
            raise NotAttention("softmax result goes to an einsum that is not p.v")
        pi = operands.index(p)
        v = operands[1 - pi]
        try:
            letters, out = parse_einsum(eq, [rank(o) for o in operands])
        except EinsumError as e:
            raise NotAttention(str(e)) from e
        lp, lv = letters[pi], letters[1 - pi]
        if len(lp) != r:
            raise NotAttention("einsum operand rank mismatch")
        batch, row, col = lp[:-2], lp[-2], lp[-1]
        extra = set(lv) - set(batch) - {col}
        if col in out or col not in lv or len(extra) != 1 or row in lv:
            raise NotAttention(f"einsum {eq!r} is not p.v over the key dimension")
        e = extra.pop()
        canon_out = batch + row + e
        if sorted(out) != sorted(canon_out):
            raise NotAttention(f"einsum {eq!r} sums over a batch dimension")
        perm = [canon_out.index(c) for c in out]
        out_ops = (("permute", perm),) if perm != list(range(len(perm))) else ()
        return to_canonical(lv, batch, col, e, v), out_ops

    # -- checks and GQA ------------------------------------------------------------------------

    def _check_shapes(self, score: _Score, v: Recipe, lq: Any, lk: Any) -> None:
        """The contraction is over the head dim: q [.., Lq, D], k [.., Lk, D], v [.., Lk, Dv]."""
        qs, ks, vs = (_recipe_shape(r) for r in (score.q, score.k, v))
        if qs is None or ks is None or vs is None:
            raise Unfusable("operand shapes are unknown")
        if not (same_size(qs[-2], lq) and same_size(ks[-2], lk) and same_size(vs[-2], lk)):
            raise NotAttention("operand lengths do not match the score matrix")
        if not same_size(qs[-1], ks[-1]):
            raise NotAttention("q and k feature sizes differ")

    def _check_rank(self, g: SiteGraph) -> None:
        """Sites of rank 2..4 map to 4-D SDPA directly; rank 5+ needs matching middle dims."""
        if g.rank > 4:
            qs, ks, vs = (_recipe_shape(r) for r in (g.q, g.k, g.v))
            mid = slice(1, g.rank - 2)
            if not (all(same_size(a, b) for a, b in zip(qs[mid], ks[mid]))
                    and all(same_size(a, b) for a, b in zip(qs[mid], vs[mid]))):
                raise Unfusable(f"rank-{g.rank} attention with broadcast heads")
            for term in [*g.mask.bool_terms, *g.mask.float_terms]:
                ms = shape(term.node)
                if ms and len(ms) > 2 and len(ms) != g.rank:
                    raise Unfusable(f"mask of rank {len(ms)} on rank-{g.rank} attention")
                if ms and len(ms) == g.rank and not all(
                    isinstance(d, int) and d == 1 for d in ms[mid]
                ) and not all(same_size(a, b) for a, b in zip(ms[mid], qs[mid])):
                    raise Unfusable("mask broadcast over some head dims only")

    def _peel_gqa(self, g: SiteGraph) -> None:
        """Recognise ``repeat_kv`` (unsqueeze+expand+reshape) or ``repeat_interleave`` on k, v."""
        if g.rank != 4 or g.k.ops or g.v.ops:
            return
        k0, rk = _unrepeat(g.k.node)
        v0, rv = _unrepeat(g.v.node)
        if k0 is not None and v0 is not None and rk == rv and rk > 1:
            g.k, g.v = Recipe(k0), Recipe(v0)

    # -- building the site ---------------------------------------------------------------------

    def _site(self, index: int, anchor: Node, g: SiteGraph, scale: float, spelling: str, *,
              already_fused: bool) -> AttentionSite:
        qs, ks, vs = (_recipe_shape(r) for r in (g.q, g.k, g.v))
        location, module_type = _location(anchor)
        folded = g.rank < 4
        heads = None if folded else hint(qs[-3])
        kv_heads = None if folded else hint(ks[-3])
        if heads and kv_heads and heads % kv_heads:
            raise Unfusable(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        dynamic = tuple(sorted({str(d) for d in (*qs, *ks) if not isinstance(d, int)}))
        return AttentionSite(
            index=index,
            location=location,
            module_type=module_type,
            spelling=spelling,
            already_fused=already_fused,
            kind=_self_or_cross(g.q.node, g.k.node, qs[-2], ks[-2]),
            batch=hint(qs[0]) if g.rank >= 3 else 1,
            heads=heads,
            kv_heads=kv_heads,
            q_len=hint(qs[-2]),
            kv_len=hint(ks[-2]),
            head_dim=hint(qs[-1]),
            value_dim=hint(vs[-1]),
            dynamic=dynamic,
            scale=scale,
            causal=g.mask.causal,
            window=g.mask.window,
            mask=g.mask.describe(),
            dtype=str(dtype(g.q.node)).replace("torch.", ""),
            graph=g,
        )

    def _unfusable_site(self, node: Node, index: int, reason: str, partial: dict) -> AttentionSite:
        location, module_type = _location(node)
        s = shape(node.args[0]) or ()
        return AttentionSite(
            index=index, location=location, module_type=module_type,
            spelling=partial.get("spelling", "softmax" if is_op(node, *SOFTMAX_OPS) else "sdpa"),
            already_fused=is_op(node, *SDPA_OPS), kind="?", batch=None, heads=None,
            kv_heads=None, q_len=hint(s[-2]) if len(s) >= 2 else None,
            kv_len=hint(s[-1]) if s else None, head_dim=None, value_dim=None, dynamic=(),
            scale=None, causal=False, window=None, mask="?",
            dtype=str(dtype(node)).replace("torch.", ""), fusable=False, reason=reason,
        )


# -- helpers -------------------------------------------------------------------------------------


def _key_from_transposed(b: Node) -> Recipe:
    """Given ``b = k^T`` (``[..., D, Lk]``), a recipe for ``k`` (``[..., Lk, D]``)."""
    r = rank(b)
    if is_op(b, aten.transpose.int):
        d0, d1 = (normalize_dim(d, r) for d in b.args[1:3])
        if {d0, d1} == {r - 2, r - 1}:
            return Recipe(b.args[0])
    if is_op(b, aten.mT.default):
        return Recipe(b.args[0])
    if is_op(b, aten.permute.default):
        perm = [normalize_dim(p, r) for p in b.args[1]]
        swapped = perm[:-2] + [perm[-1], perm[-2]]
        if swapped == list(range(r)):
            return Recipe(b.args[0])
        return Recipe(b.args[0]).then("permute", swapped)
    return Recipe(b).then("transpose", -2, -1)


def _unrepeat(node: Node) -> tuple[Node | None, int]:
    """If ``node`` repeats kv heads (``repeat_kv`` or ``repeat_interleave``): source and ratio."""
    if is_op(node, aten.repeat_interleave.self_int):
        src, reps = node.args[:2]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, Node):  # a symbolic repeat count (heads // kv_heads)
            reps = hint(reps.meta.get("val"))
        if isinstance(reps, int) and dim is not None and normalize_dim(dim, 4) == 1:
            return src, reps
        return None, 0
    if is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        ex = node.args[0]
        un = _skip_noop_slices(ex.args[0]) if is_op(ex, aten.expand.default) else None
        if is_op(un, aten.unsqueeze.default):
            src = un.args[0]
            ss, es, out = shape(src), shape(ex), shape(node)
            if (
                rank(src) == 4
                and normalize_dim(un.args[1], 5) == 2
                and es is not None and len(es) == 5
                and hint(es[2]) is not None
                and same_size(es[1], ss[1]) and same_size(es[3], ss[2])
                and same_size(es[4], ss[3])
                and out is not None and len(out) == 4
            ):
                return src, hint(es[2])
    return None, 0


def _skip_noop_slices(node: Node) -> Node:
    """Skip ``x[:, :, ...]``-style full slices (start 0, open end, step 1)."""
    while is_op(node, aten.slice.Tensor):
        args = list(node.args) + [None] * (5 - len(node.args))
        _, _, start, end, step = args[:5]
        if start not in (None, 0) or step not in (None, 1):
            break
        if end is not None and not (isinstance(end, int) and end >= 2**62):
            break
        node = node.args[0]
    return node


def _recipe_shape(r: Recipe) -> tuple | None:
    """The shape a recipe produces, computed from the base node's shape and the view ops."""
    s = shape(r.node)
    if s is None:
        return None
    s = list(s)
    for op, *args in r.ops:
        if op == "permute":
            s = [s[i] for i in args[0]]
        elif op == "transpose":
            a, b = (normalize_dim(d, len(s)) for d in args[:2])
            s[a], s[b] = s[b], s[a]
        elif op == "unsqueeze":
            s.insert(normalize_dim(args[0], len(s) + 1), 1)
        else:
            return None
    return tuple(s)


def _location(node: Node) -> tuple[str, str]:
    """(module path, module class name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
    return path or "<root>", cls_name


def _softmax_spelling(sm: Node) -> str:
    if is_op(sm, aten.softmax.int) and len(sm.args) > 2 and sm.args[2] is not None:
        return f"softmax({str(sm.args[2]).replace('torch.', '')})"
    if is_op(sm, aten._softmax.default) and len(sm.args) > 2 and sm.args[2]:
        return "softmax(float32)"
    return "softmax"


def _op_name(node: Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else node.op


def _finite(fill: float) -> float | None:
    return None if math.isinf(fill) else fill


def _self_or_cross(q: Node, k: Node, lq: Any, lk: Any) -> str:
    """Self-attention when q and k are projected from the same activation, else cross."""
    qs, ks = _sources(q), _sources(k)
    if qs and ks:
        return "self" if qs & ks else "cross"
    return "self" if same_size(lq, lk) else "cross"


def _sources(node: Node, depth: int = 40) -> set[Node]:
    """The activations that the projections (linear / matmul) leading to ``node`` read."""
    found: set[Node] = set()
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, Node):
                continue
            seen.add(n)
            if is_op(n, *_PROJECTION_OPS):
                found.add(n.args[1] if is_op(n, aten.addmm.default) else n.args[0])
                continue
            if n.op == "placeholder":
                found.add(n)
                continue
            nxt.extend(a for a in n.all_input_nodes if rank(a) and rank(a) >= 2)
        frontier = nxt
        if not frontier:
            break
    return found
