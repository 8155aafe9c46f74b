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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.fx import GraphModule, Node

from attnopt._match.evaluate import Evaluator, scalar_value
from attnopt._match.graph import (
    CAST_OPS,
    IDENTITY_OPS,
    InputDependence,
    dtype,
    fake,
    hint,
    is_op,
    normalize_dim,
    rank,
    same_size,
    shape,
    value_users,
)
from attnopt._match.layout import EinsumError, Recipe, ops_shape, parse_einsum, to_canonical
from attnopt._match.masks import HARD_FILL, MaskAnalyzer, MaskPlan
from attnopt._match.regroup import VIEW_OPS, RegroupError, keeps_rows, to_coarse, to_fine
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
_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
_SWAP_OPS = (aten.transpose.int, aten.permute.default, aten.mT.default)

# In-place ops on the score path are peeled like their out-of-place twins.
_INPLACE = {
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.mul_.Scalar: aten.mul.Scalar,
    aten.div_.Tensor: aten.div.Tensor,
    aten.div_.Scalar: aten.div.Scalar,
    aten.add_.Tensor: aten.add.Tensor,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
    aten.masked_fill_.Tensor: aten.masked_fill.Tensor,
}


def _is(node: Any, *targets: Any) -> bool:
    """Like ``is_op``, with in-place ops standing for their out-of-place twins."""
    return (isinstance(node, Node) and node.op == "call_function"
            and _INPLACE.get(node.target, node.target) in targets)


def _mutates(node: Node, arg: Node) -> bool:
    """True when ``node`` writes into ``arg`` (its first argument, by its schema)."""
    if node.op != "call_function" or not node.args or node.args[0] is not arg:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    info = schema.arguments[0].alias_info
    return bool(info is not None and info.is_write)


class NotAttention(Exception):
    """Raised inside the matcher when a softmax is not attention."""


class Unfusable(Exception):
    """Raised inside the matcher when attention is found but cannot be rewritten."""

    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.partial = partial or {}


@dataclass
class _Walk:
    """State of the walk back from a softmax: what has been peeled so far.

    ``layout`` is the shape of the scores where the walk stands (views may regroup their batch
    dims); each mask term and tensor scale remembers the layout it was found in.
    """

    layout: tuple
    factor: float = 1.0
    plan: MaskPlan = field(default_factory=MaskPlan)
    interior: set[Node] = field(default_factory=set)
    spelling: list[str] = field(default_factory=list)
    layouts: list[tuple] = field(default_factory=list)
    layout_sizes: list[list | None] = field(default_factory=list)  # view size args, if any
    bool_layouts: list[tuple] = field(default_factory=list)
    float_layouts: list[tuple] = field(default_factory=list)
    q_scales: list[tuple[Node, str, tuple]] = field(default_factory=list)
    softcap: float | None = None
    barrier: tuple[int, int, str] | None = None  # (terms so far, reason no more may come)

    def tag_terms(self) -> None:
        """Give the mask terms added since the last call the current layout; check barriers."""
        nb, nf = len(self.plan.bool_terms), len(self.plan.float_terms)
        self.bool_layouts += [self.layout] * (nb - len(self.bool_layouts))
        self.float_layouts += [self.layout] * (nf - len(self.float_layouts))
        if self.barrier is not None and self.barrier[0] != nb + nf:
            raise Unfusable(self.barrier[1])

    def set_barrier(self, reason: str) -> None:
        if self.barrier is None:
            self.barrier = (len(self.plan.bool_terms) + len(self.plan.float_terms), reason)


@dataclass
class _Score:
    """Result of walking back from a softmax to the score contraction."""

    contraction: Node
    q: Recipe
    k: Recipe
    scale: float
    walk: _Walk
    interior: set[Node] = field(default_factory=set)
    spelling: list[str] = field(default_factory=list)

    @property
    def plan(self) -> MaskPlan:
        return self.walk.plan


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
        self._order = {n: i for i, n in enumerate(gm.graph.nodes)}

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
        value_mm, v, out_ops, fwd_interior, fwd_spelling, p_layouts = self._walk_forward(sm)
        score = self._walk_back(x, sm)
        lq, lk = shape(x)[-2], shape(x)[-1]
        spelling = score.spelling + [_softmax_spelling(sm)] + fwd_spelling
        interior = score.interior | fwd_interior | {sm, value_mm}
        w = score.walk
        q, k, v, out_ops, plan, q_scale, fine = self._regroup(score, v, out_ops, p_layouts)
        score.q, score.k = q, k
        self._check_shapes(score, v, lq, lk)
        graph = SiteGraph(
            anchor=sm, output=value_mm, q=q, k=k, v=v, out_ops=out_ops, rank=len(fine),
            mask=plan, interior=interior, q_scale=q_scale, softcap=w.softcap,
        )
        self._peel_gqa(graph)
        self._check_rank(graph)
        return self._site(index, sm, graph, score.scale, "->".join(spelling), already_fused=False)

    def _regroup(self, score: _Score, v: Recipe, out_ops: tuple, p_layouts: list[tuple]):
        """Map q, k, v, mask terms and tensor scales into the finest score layout seen."""
        w = score.walk
        qk_layout, p_layout = shape(score.contraction), p_layouts[-1][0]
        candidates = [(qk_layout, _view_sizes(score.contraction)),
                      *zip(w.layouts, w.layout_sizes), *p_layouts]
        fine, sizes = max(candidates, key=lambda c: (len(c[0]), c[1] is not None))

        def to(tshape: tuple, layout: tuple) -> tuple:
            return to_fine(tshape, layout, fine, sizes)

        try:
            q = _then(score.q, to(_recipe_shape(score.q), qk_layout))
            k = _then(score.k, to(_recipe_shape(score.k), qk_layout))
            v = _then(v, to(_recipe_shape(v), p_layout))
            out_ops = to_coarse(p_layout, fine) + tuple(out_ops)
            plan = w.plan
            plan.bool_terms = [replace(t, ops=to(shape(t.node), lay))
                               for t, lay in zip(plan.bool_terms, w.bool_layouts)]
            plan.float_terms = [replace(t, ops=to(shape(t.node), lay))
                                for t, lay in zip(plan.float_terms, w.float_layouts)]
            q_scale = tuple(
                (Recipe(n, to(shape(n), lay) if fake(n) is not None else ()), op)
                for n, op, lay in w.q_scales)
        except RegroupError as e:
            raise Unfusable(str(e)) from e
        return q, k, v, out_ops, plan, q_scale, fine

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

    def _walk_back(self, x: Node, consumer: Node) -> _Score:
        """Peel casts, scales, masks, views and in-place updates down to the contraction."""
        w = _Walk(layout=shape(x))
        w.layouts.append(w.layout)
        w.layout_sizes.append(_view_sizes(x))
        while True:
            if not isinstance(x, Node):
                raise NotAttention("softmax input does not come from a tensor op")
            w.interior.add(x)
            self._peel_view_mutations(x, consumer, w)
            if is_op(x, *_PASS_OPS):
                consumer, x = x, x.args[0]
                continue
            if keeps_rows(x):
                w.layouts.append(shape(x))
                w.layout_sizes.append(_view_sizes(x))
                consumer, x = x, x.args[0]
                w.layout = shape(x)
                w.layouts.append(w.layout)
                w.layout_sizes.append(None)
                continue
            if is_op(x, *CONTRACTION_OPS):
                break
            self._check_inplace(x)
            nxt = self._peel_one(x, w)
            if nxt is None:
                if self._contraction_near(x):
                    raise Unfusable(f"unsupported op {_op_name(x)} on the score path")
                raise NotAttention(f"scores come from {_op_name(x)}, not from a contraction")
            w.tag_terms()
            consumer, x = x, nxt
        return self._contraction(x, w)

    def _peel_view_mutations(self, x: Node, consumer: Node, w: _Walk) -> None:
        """Peel in-place updates written into ``x`` through a view before ``consumer`` reads it.

        ``w.view(b, h, l, l).masked_fill_(m, -inf)`` changes ``w``: the export graph keeps the
        update on the view node, and the softmax reads ``w`` itself.
        """
        seen = self._order[consumer]
        writes = []
        for u in x.users:
            if _mutates(u, x) and u is not consumer and self._order[u] < seen:
                raise Unfusable(f"the scores are written in place by {_op_name(u)} and read "
                                "unchanged")
            if not is_op(u, *VIEW_OPS, aten.alias.default):
                continue
            for m in u.users:
                if _mutates(m, u) and self._order[m] < seen:
                    writes.append((u, m))
        for u, m in sorted(writes, key=lambda um: -self._order[um[1]]):
            if m.target not in _INPLACE or not keeps_rows(u):
                raise Unfusable(f"the scores are written in place by {_op_name(m)} through a view")
            here = w.layout
            w.layout = shape(u)
            w.layouts.append(w.layout)
            w.layout_sizes.append(_view_sizes(u))
            if self._peel_one(m, w) is not u:
                raise Unfusable(f"unsupported in-place {_op_name(m)} on a view of the scores")
            w.tag_terms()
            w.layout = here
            w.interior |= {u, m}

    def _check_inplace(self, x: Node) -> None:
        """An in-place update of the scores is peeled only when nothing else reads the tensor."""
        if x.target not in _INPLACE:
            return
        base = x.args[0]
        others = [u for u in value_users(base) if u is not x
                  and not is_op(u, *VIEW_OPS, aten.alias.default, aten.sym_size.int)]
        if others:
            raise Unfusable(f"the scores updated in place by {_op_name(x)} are also read by "
                            f"{_op_name(others[0])}")

    def _peel_one(self, x: Node, w: _Walk) -> Node | None:
        """Peel one scale / bias / mask / soft-cap op; return the score-side input."""
        plan, spelling = w.plan, w.spelling
        if _is(x, *_SCALE_OPS):
            a, b = x.args[:2]
            mul = _is(x, aten.mul.Tensor, aten.mul.Scalar)
            side, c = self._scaled_operand(a, b, commutes=mul)
            if side is not None and c is not None and c > 0:
                w.factor *= c if mul else 1.0 / c
                spelling.append("scale")
                return side
            side, t = self._tensor_scale(a, b, commutes=mul)
            if side is None:
                return None
            # A tensor (per-head) or size-dependent scale is folded into q; a mask added below
            # it would be scaled too, and inside a soft-cap it would be capped.
            w.q_scales.append((t, "mul" if mul else "div", w.layout))
            w.set_barrier("a bias or mask is added before a tensor-valued scale")
            spelling.append("scale(tensor)")
            return side
        if _is(x, aten.tanh.default):
            if w.softcap is not None or w.factor <= 0:
                return None
            if w.q_scales:
                raise Unfusable("a tensor-valued scale is applied after the soft-capping tanh")
            w.softcap, w.factor = w.factor, 1.0
            w.set_barrier("a bias or mask is added inside the soft-capping tanh")
            spelling.append("softcap")
            return x.args[0]
        factor = w.factor
        if _is(x, aten.add.Tensor, aten.sub.Tensor):
            a, b = x.args[:2]
            alpha = x.kwargs.get("alpha", 1)
            if not isinstance(a, Node) or not isinstance(b, Node) or alpha != 1:
                return None
            if self._reaches_contraction(a):
                side, other, sign = a, b, 1.0
            elif _is(x, aten.add.Tensor) and self._reaches_contraction(b):
                side, other, sign = b, a, 1.0
            else:
                return None
            if _is(x, aten.sub.Tensor):
                sign = -1.0
            if dtype(other) == torch.bool or not dtype(other) or not dtype(other).is_floating_point:
                return None
            self.masks.add_float(plan, other, factor * sign)
            spelling.append("add")
            return side
        if _is(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            base, cond, val = x.args[:3]
            fill = self._hard_fill(val)
            if fill is None or dtype(cond) != torch.bool:
                return None
            self.masks.add_bool(plan, cond, attend=False, fill=_finite(fill * factor))
            spelling.append("masked_fill")
            return base
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
            return side
        return None

    def _tensor_scale(self, a: Any, b: Any, *, commutes: bool) -> tuple[Node | None, Node | None]:
        """For ``a*b`` or ``a/b`` with a scale that is not one constant: (scores, scale) when
        the scale can be folded into q -- a symbolic scalar (``d ** -0.5`` of a dynamic head
        dim) or a tensor constant along the key dim (per-head ``[H, 1, 1]``, per-query).
        """
        pairs = [(a, b)] + ([(b, a)] if commutes else [])
        for side, t in pairs:
            if not isinstance(side, Node) or not isinstance(t, Node) or (rank(side) or 0) < 2:
                continue
            if not self._reaches_contraction(side):
                continue
            val = t.meta.get("val")
            if isinstance(val, (torch.SymFloat, torch.SymInt)):
                return side, t
            ts = shape(t)
            dt = dtype(t)
            if ts is None or dt is None or not dt.is_floating_point or len(ts) > rank(side):
                continue
            if len(ts) == 0 or (isinstance(ts[-1], int) and ts[-1] == 1):
                return side, t
        return None, None

    def _contraction(self, mm: Node, w: _Walk) -> _Score:
        """Identify q and k of the score contraction ``mm`` (matmul / bmm / einsum / baddbmm)."""
        spelling = w.spelling
        w.interior.add(mm)
        if is_op(mm, aten.einsum.default):
            q, k = self._einsum_qk(mm)
            spelling.append("einsum")
        else:
            if is_op(mm, aten.baddbmm.default):
                bias, a, b = mm.args[:3]
                beta = mm.kwargs.get("beta", mm.args[3] if len(mm.args) > 3 else 1)
                alpha = mm.kwargs.get("alpha", mm.args[4] if len(mm.args) > 4 else 1)
                if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
                    raise Unfusable("baddbmm with non-constant beta/alpha")
                if beta != 0:
                    self.masks.add_float(w.plan, bias, w.factor * beta)
                    w.tag_terms()
                w.factor *= alpha
                spelling.append("baddbmm")
            else:
                a, b = mm.args[:2]
                spelling.append("matmul" if is_op(mm, aten.matmul.default) else "bmm")
            if (rank(a) or 0) < 2 or (rank(b) or 0) < 2:
                raise NotAttention("contraction with a vector")
            q, k = Recipe(a), _key_from_transposed(b)
        factor = w.factor
        if not w.q_scales:  # a tensor scale above keeps q as it is
            q, factor = self._peel_scale(q, factor)
            k, factor = self._peel_scale(k, factor)
        if w.softcap is not None:
            factor *= w.softcap
        spelling.reverse()
        return _Score(mm, q, k, factor, w, w.interior, spelling)

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
            if _is(node, *_PASS_OPS, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                   aten.tanh.default) or keeps_rows(node):
                node = node.args[0]
            elif _is(node, *_SCALE_OPS):
                side, _ = self._scaled_operand(*node.args[:2], commutes=_is(
                    node, aten.mul.Tensor, aten.mul.Scalar))
                if side is None:
                    return any(isinstance(a, Node) and (rank(a) or 0) >= 2
                               and self._reaches_contraction(a, depth - 1)
                               for a in node.args[:2])
                node = side
            elif _is(node, aten.add.Tensor, aten.sub.Tensor):
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
        layouts = [(shape(sm), None)]
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
            if keeps_rows(u):  # probabilities viewed with their batch dims regrouped
                interior.add(u)
                layouts.append((shape(u), _view_sizes(u)))
                p = u
                continue
            if is_op(u, *_SWAP_OPS) and _swaps_last_two(u):
                # out = V @ Pᵀ (SAGAN, non-local blocks): the transpose of P @ Vᵀ.
                w = value_users(u)
                if len(w) == 1 and is_op(w[0], aten.matmul.default, aten.bmm.default) \
                        and w[0].args[1] is u and w[0].args[0] is not u:
                    v = w[0].args[0]
                    if (rank(v) or 0) != rank(p):
                        raise NotAttention("transposed probabilities contracted with a "
                                           "tensor of another rank")
                    interior.add(u)
                    spelling.append("bmm(v,pT)")
                    return (w[0], Recipe(v).then("transpose", -2, -1),
                            (("transpose", -2, -1),), interior, spelling, layouts)
                raise NotAttention(f"softmax result goes to {_op_name(u)}, not to a value "
                                   "contraction")
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
                r = rank(p)
                rv = rank(v)
                recipe = Recipe(v)
                for _ in range(r - rv):
                    recipe = recipe.then("unsqueeze", 0)
                spelling.append("matmul" if is_op(u, aten.matmul.default) else "bmm")
                return u, recipe, (), interior, spelling, layouts
            if is_op(u, aten.einsum.default):
                v, out_ops = self._einsum_value(u, p, rank(p))
                spelling.append("einsum")
                return u, v, out_ops, interior, spelling, layouts
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
        """Sites of rank 2..4 map to 4-D SDPA directly; rank 5+ flattens the middle (head)
        dims, so q, k, v must agree there and the mask must cover them all or none of them
        (or be expanded over static ones).
        """
        if g.rank <= 4:
            return
        qs, ks, vs = (_recipe_shape(r) for r in (g.q, g.k, g.v))
        mid = slice(1, g.rank - 2)
        if not (all(same_size(a, b) for a, b in zip(qs[mid], ks[mid]))
                and all(same_size(a, b) for a, b in zip(qs[mid], vs[mid]))):
            raise Unfusable(f"rank-{g.rank} attention with broadcast heads")
        covered = [False] * (g.rank - 3)
        top = 0
        for term in [*g.mask.bool_terms, *g.mask.float_terms]:
            ms = ops_shape(shape(term.node), term.ops)
            if not ms or len(ms) <= 2:
                continue
            top = max(top, len(ms))
            ms = (1,) * (g.rank - len(ms)) + tuple(ms)
            for i, (a, b) in enumerate(zip(ms[mid], qs[mid])):
                if same_size(a, b) and not (isinstance(a, int) and a == 1):
                    covered[i] = True
                elif not (isinstance(a, int) and a == 1):
                    raise Unfusable(f"mask dim of size {a} on a head dim of size {b}")
        if top and not all(covered) and any(covered):
            sizes = list(qs[mid])
            if not all(isinstance(d, int) for d in sizes):
                raise Unfusable("mask broadcast over some dynamic head dims only")
            g.mask_expand = [-1, *sizes, -1, -1]

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
            mask_kinds=g.mask.kinds(),
            dtype=str(dtype(g.q.node)).replace("torch.", ""),
            softcap=g.softcap,
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
    return ops_shape(shape(r.node), r.ops)


def _view_sizes(node: Node) -> list | None:
    """The size arguments of a view / reshape node (ints, -1 or symbolic-size nodes)."""
    if is_op(node, *VIEW_OPS) and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return None


def _then(r: Recipe, ops: tuple) -> Recipe:
    return Recipe(r.node, r.ops + tuple(ops))


def _swaps_last_two(node: Node) -> bool:
    """True for a transpose / permute that swaps the last two dims and nothing else."""
    r = rank(node.args[0])
    if r is None or r < 2:
        return False
    if is_op(node, aten.mT.default):
        return True
    if is_op(node, aten.transpose.int):
        return {normalize_dim(d, r) for d in node.args[1:3]} == {r - 2, r - 1}
    perm = [normalize_dim(p, r) for p in node.args[1]]
    return perm == [*range(r - 2), r - 1, r - 2]


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
