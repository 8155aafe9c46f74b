"""AttentionSite: the canonical form of one attention found in a captured graph.

Whatever the spelling (matmul / bmm / einsum / ``@``, scale on the scores or on q, masks by add,
``masked_fill`` or ``where``, GQA by expand+reshape, heads folded into the batch), a site
describes the same computation::

    out = softmax(scale * q @ k^T + mask [, causal]) @ v
    q: [B, H, Lq, D]   k: [B, Hkv, Lk, D]   v: [B, Hkv, Lk, Dv]   out: [B, H, Lq, Dv]

plus the recipes that read q, k, v, the mask and the output layout from the graph. The matcher
that produces sites lives in ``attnopt._match.matcher``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

from attnopt._match.layout import Recipe
from attnopt._match.masks import MaskPlan


@dataclass
class SiteGraph:
    """Graph-level handles of a site (internal: never part of the public report).

    Attributes:
        anchor: the softmax node (or the SDPA node for an already fused site).
        output: the node whose value the site produces (the value contraction / SDPA call).
        q, k, v: recipes reading the canonical operands ``[*batch, L, D]``.
        out_ops: view ops mapping the canonical ``[*batch, Lq, Dv]`` output to ``output``'s layout.
        rank: rank of the canonical operands (batch dims + 2).
        mask: the mask plan.
        interior: nodes between the operands and the output that the rewrite makes dead.
        q_scale: tensor-valued or size-dependent scales folded into q, as (recipe, "mul"|"div").
        softcap: the soft-capping constant c of ``c * tanh(scores / c)``, if the code caps.
        mask_expand: sizes to expand a rank > 4 mask to before its head dims are flattened.
    """

    anchor: Node
    output: Node
    q: Recipe
    k: Recipe
    v: Recipe
    out_ops: tuple[tuple[Any, ...], ...]
    rank: int
    mask: MaskPlan
    interior: set[Node] = field(default_factory=set)
    q_scale: tuple[tuple[Recipe, str], ...] = ()
    softcap: float | None = None
    mask_expand: list | None = None


@dataclass
class AttentionSite:
    """One attention in the user's model, in canonical form.

    Attributes:
        index: position of the site in graph order (0-based).
        location: module path in the user's model (``"encoder.layer.0.attention.self"``).
        module_type: class name of that module (``"BertSelfAttention"``).
        spelling: how the code wrote it, e.g. ``"matmul*scale+mask->softmax(fp32)->matmul"``.
        already_fused: True when the code already called ``scaled_dot_product_attention``.
        kind: ``"self"`` or ``"cross"``.
        batch, heads, kv_heads, q_len, kv_len, head_dim, value_dim: sizes of the example inputs
            (``heads`` is None when heads are folded into the batch dimension).
        dynamic: names of dimensions that are symbolic in the captured graph.
        scale: the softmax scale (folded from every mul/div on the path).
        causal: True when a mask was recognised as causal.
        window: a local window recognised in the mask, if any.
        mask: description of what masks remain (``"causal+padding"``, ``"bias"``, ...), for
            display; code reads ``mask_kinds``.
        mask_kinds: the same as a tuple of kinds (``("causal", "padding")``; empty: no mask).
        fusable: False when the site is attention but must be left exact.
        reason: why it is not fusable (None when it is).
        softcap: c when the logits are soft-capped as ``c * tanh(scores / c)`` (Gemma-2).
    """

    index: int
    location: str
    module_type: str
    spelling: str
    already_fused: bool
    kind: str
    batch: int | None
    heads: int | None
    kv_heads: int | None
    q_len: int | None
    kv_len: int | None
    head_dim: int | None
    value_dim: int | None
    dynamic: tuple[str, ...]
    scale: float | None
    causal: bool
    window: int | None
    mask: str
    dtype: str
    fusable: bool = True
    reason: str | None = None
    softcap: float | None = None
    mask_kinds: tuple[str, ...] = ()
    graph: SiteGraph | None = field(default=None, repr=False, compare=False)

    @property
    def gqa_ratio(self) -> int | None:
        """Query heads per key/value head (1 = MHA), or None when unknown."""
        if self.heads and self.kv_heads:
            return self.heads // self.kv_heads
        return None

    def to_dict(self) -> dict[str, Any]:
        """The site as plain JSON-serialisable data (graph handles excluded)."""
        return {
            "index": self.index,
            "location": self.location,
            "module_type": self.module_type,
            "spelling": self.spelling,
            "already_fused": self.already_fused,
            "kind": self.kind,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "gqa_ratio": self.gqa_ratio,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "value_dim": self.value_dim,
            "dynamic": list(self.dynamic),
            "scale": self.scale,
            "causal": self.causal,
            "window": self.window,
            "mask": self.mask,
            "mask_kinds": list(self.mask_kinds),
            "dtype": self.dtype,
            "fusable": self.fusable,
            "reason": self.reason,
            "softcap": self.softcap,
        }


@dataclass(frozen=True)
class Rejected:
    """A softmax that was examined and judged not to be attention, with the reason."""

    location: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """Plain data for reports."""
        return {"location": self.location, "reason": self.reason}
