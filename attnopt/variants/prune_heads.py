"""Prune attention heads (Michel et al., 2019): the least important heads of a site are dropped.

``PruneHeads(fraction=f)`` drops ``round(f · H)`` query heads per site (``scope="site"``) or
over every site together (``scope="model"``, as the paper prunes globally), keeping at least one
head per site. A dropped head's output is replaced by its **mean output on the calibration
data** (mean ablation, a constant per head), which never does worse on the calibration data
than zeroing it and needs no retraining.

Importance (calibration, gradient-free proxy of the paper's ``|∂L/∂ξ_h|``): per query head, the
variance of its attention output over the valid query rows of the calibration samples,
``E ||o_h - mean(o_h)||²`` — exactly the squared error mean ablation adds to the site's output
(before the output projection). With ``scope="model"`` each site's importances are divided by
the site's output energy ``Σ_h E ||o_h||²`` (the paper normalises per layer too), so they rank
heads across layers by the *relative* error each one's removal adds to its layer. The output
projection is not seen here, so a head whose outputs the projection shrinks may be kept
needlessly: that is the proxy's limit.

Rewrite: the kept heads' q / k / v are gathered (``index_select`` on the head axis, GQA: the kv
head of each kept query head) and ``torch.ops.attnopt.prune_heads`` runs exact attention (SDPA)
on them, then writes the constant outputs of the dropped heads. Where a site's q, k or v comes
straight from a linear projection (``linear → view [B, L, H, D] → transpose(1, 2)``, as in HF
BERT-style encoders), the projection itself is narrowed to the kept heads' rows instead of
gathering afterwards, so the pruned heads' projections are not computed at all. Projections
behind other ops (e.g. rotary embeddings) keep their full width and are gathered; the output
projection keeps its full width (the dropped heads' constants go through it).

ONNX (both targets): the gathers are standard ``Gather`` ops, the exact attention lowering of
the target runs on the kept heads, and one ``ScatterElements`` writes them into the constant
outputs (``Expand`` of the means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnopt._match.graph import fake
from attnopt.errors import ConfigError
from attnopt.export._registry import onnx_translation, translation_on_exact
from attnopt.variants import _sparse
from attnopt.variants._base import SiteOperands, Variant, buffer_node, register
from attnopt.variants.fused import attention, attention_onnx, attention_ort, reference_attention

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite

aten = torch.ops.aten

#: where ``fraction`` is counted: per site, or over every site of the model.
SCOPES = ("site", "model")


@dataclass(frozen=True, kw_only=True)
class PruneHeads(Variant):
    """Drop the least important attention heads, chosen on calibration data.

    Attributes:
        fraction: fraction of query heads to drop, in [0, 1). Each site keeps at least one head.
        scope: ``"site"``: each site drops ``fraction`` of its own heads; ``"model"``: the
            heads of every site this config applies to are ranked together (importances
            normalised per site), so layers with unimportant heads lose more of them.
    """

    name = "prune_heads"
    exact = False

    fraction: float = 0.25
    scope: str = "site"

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigError(f"fraction must be a number in [0, 1) (the share of heads to drop, "
                              f"e.g. 0.25), got {f!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")


@dataclass(frozen=True)
class HeadImportance:
    """The fitted state of a site: which query heads are kept, and why."""

    keep: tuple[bool, ...]           # per query head
    importance: tuple[float, ...]    # per query head: E ||o_h - mean(o_h)||² on calibration
    energy: float                    # Σ_h E ||o_h||²: the site's output energy
    fill: torch.Tensor               # [H, Dv]: each head's mean output (used for dropped heads)

    def removed_error(self) -> float:
        """Relative output error (L2) the dropped heads add on calibration: the proxy's
        ``sqrt(Σ_dropped importance / energy)``.
        """
        lost = sum(i for i, k in zip(self.importance, self.keep) if not k)
        return math.sqrt(lost / max(self.energy, 1e-30))

    def describe(self) -> str:
        """E.g. ``dropped heads [1, 3] of 4 (calibration output error 0.021)``."""
        dropped = [h for h, k in enumerate(self.keep) if not k]
        return (f"dropped heads {dropped} of {len(self.keep)} (mean-ablated; calibration output "
                f"error {self.removed_error():.3g})")


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::prune_heads", mutates_args=())
def prune_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    keep: torch.Tensor,
    fill: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Exact attention on the kept heads; every other head outputs its constant ``fill`` row.

    Args:
        q: ``[B, n, Lq, D]`` the kept query heads (already gathered).
        k: ``[B, n, Lk, D]``, v: ``[B, n, Lk, Dv]``: the kv head of each kept query head.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, n, Lq, Lk]`` (head-specific masks already gathered).
        keep: int64 ``[n]``: the original index of each kept head (increasing).
        fill: ``[H, Dv]``: each head's constant output; the rows of kept heads are unused.
        is_causal: key j is visible to query i only when ``j <= i``.
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous.
    """
    _sparse.check_operands(q, k, v, attn_mask)
    b, n, lq, _ = q.shape
    if keep.shape != (n,):
        raise ValueError(f"keep must list the {n} kept heads, got shape {tuple(keep.shape)}")
    out = fill.to(q.dtype)[None, :, None, :].expand(b, -1, lq, -1).contiguous()
    if n:
        kept = attention(q, k, v, attn_mask, is_causal, scale)
        out.index_copy_(1, keep.to(q.device), kept)
    return out


@prune_heads.register_fake
def _(q, k, v, attn_mask, keep, fill, is_causal, scale):
    return q.new_empty((q.shape[0], fill.shape[0], q.shape[2], v.shape[-1]))


def reference_prune_heads(q, k, v, attn_mask, keep_flags: torch.Tensor, fill: torch.Tensor,
                          is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Slow reference on the *full* operands: dense attention of every head, then each dropped
    head (``keep_flags[h]`` False) replaced by its ``fill`` row.
    """
    out = reference_attention(q, k, v, attn_mask, is_causal, scale)
    dropped = ~keep_flags.to(torch.bool)
    return torch.where(dropped[None, :, None, None], fill.to(out.dtype)[None, :, None, :], out)


# -- calibration -----------------------------------------------------------------------------------


def head_importance(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Per query head ``E ||o_h - mean(o_h)||²`` ``[H]``, the output energy ``Σ_h E ||o_h||²``
    and the mean outputs ``[H, Dv]``, over the valid rows of ``samples``' exact outputs.
    """
    h, dv = samples[0]["out"].shape[1], samples[0]["out"].shape[-1]
    count = 0.0
    total = torch.zeros(h, dv, dtype=torch.float64)
    square = torch.zeros(h, dtype=torch.float64)
    for s in samples:
        out = s["out"].double().cpu()
        rows = _sparse.valid_query_rows(s.get("mask"), out.shape[0], out.shape[2],
                                        s["k"].shape[2])
        count += float(rows.sum())
        total += (out * rows).sum((0, 2))
        square += ((out ** 2) * rows).sum((0, 2, 3))
    count = max(count, 1.0)
    mean = total / count
    variance = (square / count - (mean ** 2).sum(-1)).clamp_min(0.0)
    return variance, float(square.sum() / count), mean.float()


def choose_kept(importance: torch.Tensor, fraction: float) -> tuple[bool, ...]:
    """Keep all but the ``round(fraction · H)`` least important heads (at least one kept)."""
    h = importance.shape[0]
    drop = min(h - 1, math.floor(fraction * h + 0.5))
    dropped = set(torch.argsort(importance, stable=True)[:drop].tolist())
    return tuple(i not in dropped for i in range(h))


# -- projection narrowing --------------------------------------------------------------------------

_TO_HEADS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def narrow_projection(graph: Graph, x: Node, heads: list[int], site: AttentionSite,
                      tag: str) -> Node | None:
    """``x`` = ``transpose(view(linear(a, W, b), [B, L, H, D]), 1, 2)`` rebuilt on the rows of
    ``heads`` only (a narrower ``linear``); None when ``x`` is not that chain of get_attr weights.
    """
    if x.op != "call_function":
        return None
    if x.target is aten.transpose.int:
        if sorted(d % 4 for d in x.args[1:3]) != [1, 2]:
            return None
    elif x.target is aten.permute.default:
        if [d % 4 for d in x.args[1]] != [0, 2, 1, 3]:
            return None
    else:
        return None
    view = x.args[0]
    if not (isinstance(view, torch.fx.Node) and view.target in _TO_HEADS):
        return None
    lin = view.args[0]
    shape = list(view.args[1])
    if not (isinstance(lin, torch.fx.Node) and lin.target is aten.linear.default
            and len(shape) == 4 and isinstance(shape[3], int)):
        return None
    weight, bias = lin.args[1], lin.args[2] if len(lin.args) > 2 else None
    owner = graph.owning_module
    if owner is None or not _is_attr(weight) or (bias is not None and not _is_attr(bias)):
        return None
    w = _attr(owner, weight.target)
    d = shape[3]
    if w is None or w.dim() != 2 or w.shape[0] % d:
        return None
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    if int(rows.max()) >= w.shape[0]:
        return None
    new_w = buffer_node(graph, site, f"attnopt_prune_{site.index}_{tag}_weight", w[rows])
    new_b = None
    if bias is not None:
        b = _attr(owner, bias.target)
        if b is None:
            return None
        new_b = buffer_node(graph, site, f"attnopt_prune_{site.index}_{tag}_bias", b[rows])
    shape[2] = len(heads) if shape[2] != -1 else -1
    narrow = graph.call_function(aten.linear.default, (lin.args[0], new_w, new_b))
    narrow = graph.call_function(view.target, (narrow, shape))
    return graph.call_function(x.target, (narrow, *x.args[1:]))


def _is_attr(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _attr(module: torch.nn.Module, target: str) -> torch.Tensor | None:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj.detach() if isinstance(obj, torch.Tensor) else None


# -- the implementation ----------------------------------------------------------------------------


@register(PruneHeads)
class PruneHeadsImpl:
    """Emits ``torch.ops.attnopt.prune_heads`` on sites with a known head layout."""

    def can_apply(self, config: PruneHeads, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if not site.heads or not site.kv_heads:
            return "pruning heads needs the site's head layout (heads are folded into the batch)"
        return None

    def static_dims(self, config: PruneHeads, site: AttentionSite) -> tuple[str, ...]:
        """Head counts and the value dim stay at their example sizes (the kept heads and the
        mean outputs depend on them; see ``passes/static_sizes``).
        """
        return ("heads", "kv_heads", "value_dim")

    def fit(self, config: PruneHeads, site: AttentionSite, samples: list[dict[str, Any]]
            ) -> HeadImportance | None:
        """Head importances and mean outputs on ``samples`` (see the module docstring)."""
        if not samples:
            return None
        with torch.no_grad():
            importance, energy, fill = head_importance(samples)
        return HeadImportance(keep=choose_kept(importance, config.fraction),
                              importance=tuple(float(x) for x in importance), energy=energy,
                              fill=fill)

    def fit_jointly(self, config: PruneHeads, states: dict[int, HeadImportance | None]
                    ) -> dict[int, HeadImportance | None]:
        """``scope="model"``: drop the ``round(fraction · all heads)`` heads whose removal adds
        the least relative error to their site, over every site fitted with ``config`` (each
        site keeps at least one head).
        """
        fitted = {i: s for i, s in states.items() if s is not None}
        if config.scope != "model" or not fitted:
            return states
        keys = [(i, h) for i in sorted(fitted) for h in range(len(fitted[i].keep))]
        score = torch.tensor([fitted[i].importance[h] / max(fitted[i].energy, 1e-30)
                              for i, h in keys], dtype=torch.float64)
        budget = math.floor(config.fraction * len(keys) + 0.5)
        left = {i: len(s.keep) for i, s in fitted.items()}
        dropped: set[tuple[int, int]] = set()
        for j in torch.argsort(score, stable=True).tolist():
            if len(dropped) == budget:
                break
            i, h = keys[j]
            if left[i] > 1:
                dropped.add((i, h))
                left[i] -= 1
        out = dict(states)
        for i, s in fitted.items():
            out[i] = HeadImportance(keep=tuple((i, h) not in dropped for h in range(len(s.keep))),
                                    importance=s.importance, energy=s.energy, fill=s.fill)
        return out

    def emit(self, config: PruneHeads, graph: Graph, ops: SiteOperands, site: AttentionSite
             ) -> Node:
        state = ops.state if isinstance(ops.state, HeadImportance) else None
        heads, dv = site.heads, site.value_dim or site.head_dim
        if state is None:  # not fitted (no calibration samples): nothing is dropped
            state = HeadImportance(keep=(True,) * heads, importance=(0.0,) * heads, energy=0.0,
                                   fill=torch.zeros(heads, dv))
        kept = [h for h, k in enumerate(state.keep) if k]
        group = heads // site.kv_heads
        kv = [h // group for h in kept]
        tag = f"attnopt_prune_{site.index}"
        keep = buffer_node(graph, site, f"{tag}_keep", torch.tensor(kept, dtype=torch.int64))
        kv_idx = keep if group == 1 else buffer_node(graph, site, f"{tag}_kv",
                                                     torch.tensor(kv, dtype=torch.int64))

        def gathered(x: Node, idx: Node, rows: list[int], name: str) -> Node:
            if len(rows) == (heads if idx is keep else site.kv_heads) and rows == sorted(rows) \
                    and rows == list(range(len(rows))):
                return x
            narrow = narrow_projection(graph, x, rows, site, name)
            return narrow if narrow is not None else graph.call_function(
                aten.index_select.default, (x, 1, idx))

        q = gathered(ops.q, keep, kept, "q")
        k = gathered(ops.k, kv_idx, kv, "k")
        v = gathered(ops.v, kv_idx, kv, "v")
        mask = ops.mask
        if mask is not None and _head_dim(mask) not in (None, 1):
            mask = graph.call_function(aten.index_select.default, (mask, 1, keep))
        fill = buffer_node(graph, site, f"{tag}_fill", state.fill)
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(torch.ops.attnopt.prune_heads.default,
                                   (q, k, v, mask, keep, fill, ops.causal, scale))

    def density(self, config: PruneHeads, site: AttentionSite,
                state: HeadImportance | None = None) -> float:
        """Fraction of heads computed (kept)."""
        heads = site.heads or 1
        if state is None:
            return sum(choose_kept(torch.arange(float(heads)), config.fraction)) / heads
        return sum(state.keep) / len(state.keep)

    def describe_state(self, config: PruneHeads, site: AttentionSite,
                       state: HeadImportance | None) -> str | None:
        """The report note: which heads were dropped and the calibration error they add."""
        return state.describe() if isinstance(state, HeadImportance) else None


def _head_dim(node: Node) -> int | None:
    val = fake(node)
    if val is None or val.dim() < 4:
        return None
    return int(val.shape[1]) if isinstance(val.shape[1], int) else -1


# -- ONNX ------------------------------------------------------------------------------------------


def _lower(q, k, v, attn_mask, keep, fill, is_causal: bool, scale: float, fused):
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    kept = fused(q, k, v, attn_mask, is_causal, scale)               # [B, n, Lq, Dv]
    heads = ox.static(fill, 0, "head count", who="prune_heads")
    dv = ox.static(fill, 1, "value dim", who="prune_heads")
    shape = op.Concat(op.Shape(kept, start=0, end=1), ox.ints(heads),
                      op.Shape(kept, start=2, end=3), ox.ints(dv), axis=0)
    base = op.Expand(op.Reshape(op.CastLike(fill, kept), ox.ints(1, heads, 1, dv)), shape)
    index = op.Expand(op.Reshape(keep, ox.ints(1, -1, 1, 1)), op.Shape(kept))
    return op.ScatterElements(base, index, kept, axis=1)


@translation_on_exact(torch.ops.attnopt.prune_heads.default)
def prune_heads_on(exact):
    """:func:`prune_heads_onnx` with ``exact`` for the kept heads."""

    def lower(q, k, v, attn_mask, keep, fill, is_causal: bool = False, scale: float = 1.0):
        return _lower(q, k, v, attn_mask, keep, fill, is_causal, scale, exact)

    return lower


@onnx_translation(torch.ops.attnopt.prune_heads.default, "onnx")
def prune_heads_onnx(q, k, v, attn_mask, keep, fill, is_causal: bool = False, scale: float = 1.0):
    """Standard ``Attention`` on the kept heads; ``ScatterElements`` into the mean outputs."""
    return _lower(q, k, v, attn_mask, keep, fill, is_causal, scale, attention_onnx)


@onnx_translation(torch.ops.attnopt.prune_heads.default, "onnxruntime")
def prune_heads_ort(q, k, v, attn_mask, keep, fill, is_causal: bool = False, scale: float = 1.0):
    """As :func:`prune_heads_onnx`, the kept heads through the contrib attention ops."""
    return _lower(q, k, v, attn_mask, keep, fill, is_causal, scale, attention_ort)
