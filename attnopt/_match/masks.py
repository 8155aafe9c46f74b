"""Mask analysis: split the additive / boolean terms of attention scores into what they mean.

Every term that reaches the scores (``scores + m``, ``masked_fill(scores, m, -inf)``,
``where(m, scores, min)``, an SDPA ``attn_mask``) is decomposed through and-trees, add-trees,
``where(c, 0, min)`` conversions and broadcasts. Input-independent parts are *evaluated* for two
input sizes and classified: all-attend (dropped), causal (becomes ``is_causal``), a band (a local
window, reported), anything else (kept). Input-dependent parts (padding masks) stay masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from attnopt._match.evaluate import Evaluator
from attnopt._match.graph import IDENTITY_OPS, InputDependence, dtype, is_op, shape

aten = torch.ops.aten

# A fill value at or below this is a hard mask: exp(fill - max) underflows to 0 in fp32/fp16.
HARD_FILL = -1.0e4

_AND_OPS = (aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor)
_OR_OPS = (aten.__or__.Tensor, aten.logical_or.default, aten.bitwise_or.Tensor)
_NOT_OPS = (aten.logical_not.default, aten.bitwise_not.default)
_BOOL_PASS_OPS = (aten.expand.default, *IDENTITY_OPS, aten.to.dtype, aten.to.dtype_layout,
                  aten._to_copy.default)


@dataclass(frozen=True)
class BoolTerm:
    """A boolean mask leaf. ``attend`` is True when True means "may attend".

    ``fill`` is the finite value the original code wrote at masked positions (None for -inf):
    a finite fill is kept as an additive float mask so fully-masked rows behave as before.
    """

    node: Node
    attend: bool
    fill: float | None = None
    label: str = "mask"
    ops: tuple = ()  # view ops into the site's canonical layout (see attnopt._match.regroup)


@dataclass(frozen=True)
class FloatTerm:
    """An additive float term (bias or float mask), multiplied by ``factor``."""

    node: Node
    factor: float = 1.0
    label: str = "bias"
    ops: tuple = ()  # view ops into the site's canonical layout (see attnopt._match.regroup)


@dataclass
class MaskPlan:
    """What the masks of one site amount to."""

    causal: bool = False
    window: int | None = None
    bool_terms: list[BoolTerm] = field(default_factory=list)
    float_terms: list[FloatTerm] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no mask tensor remains (causal alone needs none)."""
        return not self.bool_terms and not self.float_terms

    def kinds(self) -> tuple[str, ...]:
        """The kinds of mask terms, e.g. ``("causal", "padding")`` (empty: no mask)."""
        return tuple(dict.fromkeys((["causal"] if self.causal else []) + self.labels))

    def describe(self) -> str:
        """A short human description, e.g. ``"causal+padding"``."""
        return "+".join(self.kinds()) or "none"


class _NotAMask(Exception):
    """A where/masked_fill whose other operand is a non-zero constant: not a mask conversion."""


class MaskAnalyzer:
    """Classifies mask terms of one graph. See the module docstring."""

    def __init__(self, evaluator: Evaluator, depends: InputDependence) -> None:
        self._ev = evaluator
        self._depends = depends

    def add_bool(self, plan: MaskPlan, node: Node, *, attend: bool, fill: float | None) -> None:
        """Add a boolean term (True = attend when ``attend``) reaching the scores."""
        self._split_bool(plan, node, attend, fill)

    def add_float(self, plan: MaskPlan, node: Node, factor: float) -> None:
        """Add an additive float term ``factor * node`` reaching the scores."""
        self._split_float(plan, node, factor)

    # -- boolean trees -------------------------------------------------------------------------

    def _split_bool(self, plan: MaskPlan, node: Node, attend: bool, fill: float | None) -> None:
        if not self._depends(node):
            kind = self._classify(node, is_bool=True, attend=attend)
            self._record_static(plan, node, kind, attend=attend, fill=fill)
            return
        if is_op(node, *_NOT_OPS):
            self._split_bool(plan, node.args[0], not attend, fill)
            return
        if is_op(node, *_BOOL_PASS_OPS) and dtype(node.args[0]) == torch.bool:
            self._split_bool(plan, node.args[0], attend, fill)
            return
        combine = _AND_OPS if attend else _OR_OPS
        if is_op(node, *combine) and all(
            dtype(a) == torch.bool for a in node.args[:2] if isinstance(a, Node)
        ):
            for a in node.args[:2]:
                self._split_bool(plan, a, attend, fill)
            return
        plan.bool_terms.append(BoolTerm(node, attend, fill, _input_label(node)))
        plan.labels.append(_input_label(node))

    # -- float trees ---------------------------------------------------------------------------

    def _split_float(self, plan: MaskPlan, node: Node, factor: float) -> None:
        if is_op(node, aten.add.Tensor) and all(isinstance(a, Node) for a in node.args[:2]):
            if node.kwargs.get("alpha", 1) == 1:
                for a in node.args[:2]:
                    self._split_float(plan, a, factor)
                return
        if is_op(node, aten.expand.default, *IDENTITY_OPS):
            self._split_float(plan, node.args[0], factor)
            return
        try:
            converted = self._bool_to_float(node)
        except _NotAMask:
            converted = None
        if converted is not None:
            cond, attend, fill, base = converted
            if base is not None:
                self._split_float(plan, base, factor)
            self._split_bool(plan, cond, attend, None if fill * factor <= float("-inf")
                             else fill * factor)
            return
        if not self._depends(node):
            kind = self._classify(node, is_bool=False, attend=True)
            self._record_static(plan, node, kind, factor=factor)
            return
        label = _input_label(node)
        plan.float_terms.append(FloatTerm(node, factor, label))
        plan.labels.append(label)

    def _bool_to_float(self, node: Node) -> tuple[Node, bool, float, Node | None] | None:
        """Recognise a boolean mask written into a float tensor with a hard (very negative) fill.

        ``where(c, x, fill)``, ``where(c, fill, x)`` and ``masked_fill(x, c, fill)`` equal
        ``x + mask(c)`` under softmax. Returns (condition, True-means-attend, fill, x), with x
        None when it is the constant 0; None when ``node`` is none of these.
        """
        if is_op(node, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                 aten.where.Scalar):
            cond, a, b = node.args[:3]
            if dtype(cond) != torch.bool:
                return None
            va, vb = self._const(a), self._const(b)
            if vb is not None and vb <= HARD_FILL and va != vb:
                return cond, True, vb, self._base(a, va)
            if va is not None and va <= HARD_FILL and va != vb:
                return cond, False, va, self._base(b, vb)
            return None
        if is_op(node, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            base, cond, val = node.args[:3]
            v = self._const(val)
            if dtype(cond) == torch.bool and v is not None and v <= HARD_FILL:
                return cond, False, v, self._base(base, self._const(base))
        return None

    @staticmethod
    def _base(arg: object, const: float | None) -> Node | None:
        """The float operand beside a mask fill: None when it is the constant 0."""
        if const == 0.0:
            return None
        if isinstance(arg, Node) and dtype(arg) is not None and dtype(arg).is_floating_point:
            return arg
        raise _NotAMask()

    # -- static (input-independent) terms ------------------------------------------------------

    def _record_static(
        self,
        plan: MaskPlan,
        node: Node,
        kind: tuple[str, int | None],
        *,
        attend: bool = True,
        fill: float | None = None,
        factor: float = 1.0,
    ) -> None:
        name, window = kind
        if name == "all":
            return
        if name == "causal":
            plan.causal = True
            return
        if name in ("causal_window", "window"):
            # A causal band is causal (the fused kernel skips future blocks) and a window
            # (the band term stays as the mask; a sliding-window variant can use it natively).
            plan.window = window
            plan.causal = plan.causal or name == "causal_window"
            label = f"window={window}"
        else:
            label = name
        if dtype(node) == torch.bool:
            plan.bool_terms.append(BoolTerm(node, attend, fill, label))
        else:
            plan.float_terms.append(FloatTerm(node, factor, label))
        plan.labels.append(label)

    def _classify(self, node: Node, *, is_bool: bool, attend: bool) -> tuple[str, int | None]:
        """Evaluate an input-independent mask term and name its pattern.

        Returns one of ("all", None), ("causal", None), ("causal_window", w), ("window", w),
        ("static mask", None) or ("bias", None) -- the same for every evaluated input size.
        """
        try:
            values = self._ev.values(node)
        except Exception:  # noqa: BLE001 - cannot evaluate alone: keep the term as it is
            return ("static mask" if is_bool else "bias", None)
        kinds = {_pattern(v, is_bool=is_bool, attend=attend) for v in values}
        if len(kinds) == 1:
            return kinds.pop()
        return ("static mask" if is_bool else "bias", None)

    def _const(self, arg: object) -> float | None:
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if isinstance(arg, Node) and not self._depends(arg):
            try:
                vals = self._ev.values(arg)
            except Exception:  # noqa: BLE001
                return None
            flat = []
            for v in vals:
                if not isinstance(v, torch.Tensor) or v.numel() == 0:
                    return None
                u = torch.unique(v.float())
                if u.numel() != 1:
                    return None
                flat.append(float(u.item()))
            return flat[0] if all(f == flat[0] for f in flat) else None
        return None

    def _const_all_zero(self, arg: object) -> bool:
        return self._const(arg) == 0.0


def _pattern(value: torch.Tensor, *, is_bool: bool, attend: bool) -> tuple[str, int | None]:
    """Name the pattern of one evaluated mask term (see MaskAnalyzer._classify)."""
    other = ("static mask", None) if is_bool else ("bias", None)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return other
    if is_bool or value.dtype == torch.bool:
        allowed = value if attend else ~value
    else:
        masked = value <= HARD_FILL
        if not bool(((value == 0) | masked).all()):
            return other
        allowed = ~masked
    lq, lk = allowed.shape[-2], allowed.shape[-1]
    flat = allowed.reshape(-1, lq, lk)
    if not bool((flat == flat[:1]).all()):
        return other
    m = flat[0]
    if bool(m.all()):
        return ("all", None)
    if lq != lk or lq < 2:
        return other
    i = torch.arange(lq, device=m.device).unsqueeze(1)
    j = torch.arange(lk, device=m.device).unsqueeze(0)
    if torch.equal(m, j <= i):
        return ("causal", None)
    w = int(m[-1].sum())
    if torch.equal(m, (j <= i) & (i - j < w)):
        return ("causal_window", w)
    w2 = int(m[0].sum()) - 1
    if torch.equal(m, (i - j).abs() <= w2):
        return ("window", w2)
    return other


def _input_label(node: Node) -> str:
    return "padding" if _looks_like_padding(node) else "mask"


def _looks_like_padding(node: Node) -> bool:
    """A [B, 1, 1, Lk]-like mask (varies along batch and keys only) is a key padding mask."""
    s = shape(node)
    if not s or len(s) < 2:
        return False
    def one(d: object) -> bool:
        return isinstance(d, int) and d == 1

    return all(one(d) for d in s[1:-1]) if len(s) > 2 else one(s[-2])
