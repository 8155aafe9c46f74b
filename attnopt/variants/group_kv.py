"""Group kv heads (GQA from a multi-head checkpoint, Ainslie et al. 2023): Hkv kv heads → G.

``GroupKV(groups=G)`` replaces a site's ``Hkv`` key / value heads by ``G`` heads, each the mean
of the ``Hkv / G`` consecutive original heads of its group, and runs the site as GQA with ``G``
kv heads (query head ``h`` reads pooled head ``h // (H / G)``, the group of the kv head it read
before). The projections are linear, so mean-pooling the k / v *projection* heads (what the paper
does to the checkpoint) is exactly mean-pooling the k / v *activations* per head: the op pools the
activations and a deployment may pool the weights instead, with the same result.

Constraints: the site's head counts are known (not folded into the batch), ``G`` divides ``Hkv``
and ``G < Hkv``; soft-capped sites stay exact (the plan refuses them for every approximate
variant). Self and cross attention are both accepted: pooling needs no position structure.

Calibration (optional: only with ``Config(calibration=...)``; without it, mean pooling only),
closed-form least squares, no training:

  * key map, per original kv head ``j``: ``A_j = argmin ||k_pool A - k_j||`` over valid keys, with
    an intercept (centred: a constant added to every key shifts the scores of a query by a
    constant, which the softmax ignores). Then ``q_h A_jᵀ k_poolᵀ ≈ q_h k_jᵀ`` for every query of
    head ``h``: the op applies ``wq[h] = A_jᵀ`` to the queries (foldable into the q projection);
  * output map, per query head ``h``: ``(W_h, b_h) = argmin ||o_h W + b - out_h||`` where ``o_h``
    is the grouped attention output (with the key map) and ``out_h`` the exact one. Since every
    row of the probabilities sums to 1, this is a per-head affine map of the pooled values
    (``P (v W + b) = (P v) W + b``), foldable into the output projection.

Normal equations are accumulated in float64 over the calibration samples with a tiny ridge. The
fit is kept only where it lowers the attention-output error on the calibration samples (mean
pooling alone, or the maps fitted without the key map, otherwise); the report note says which.

The op ``torch.ops.attnopt.group_kv`` pools k / v and calls the exact attention op (SDPA with
GQA: no N×N scores, no repeated k / v on CPU). ONNX (both targets): ``Reshape`` + ``ReduceMean``
pools k / v, ``MatMul`` / ``Add`` apply the maps, and the exact attention lowering of the target
runs with ``kv_num_heads = G`` (``Attention`` for "onnx"; ``GroupQueryAttention`` /
``MultiHeadAttention`` for "onnxruntime").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnopt.errors import ConfigError
from attnopt.export._registry import onnx_translation, translation_on_exact
from attnopt.variants import _sparse
from attnopt.variants._base import SiteOperands, Variant, buffer_node, register
from attnopt.variants.fused import attention, attention_onnx, attention_ort, reference_attention

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite

#: ridge of the normal equations, relative to the mean diagonal of the Gram matrix.
RIDGE = 1e-6


@dataclass(frozen=True, kw_only=True)
class GroupKV(Variant):
    """Mean-pool the kv heads of each site into ``groups`` kv heads (MHA → GQA / MQA).

    Attributes:
        groups: kv heads after grouping (``1`` = MQA). Must divide the site's kv-head count and
            be smaller than it; sites where it does not are left exact, with the reason.
    """

    name = "group_kv"
    exact = False

    groups: int = 1

    def __post_init__(self) -> None:
        g = self.groups
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ConfigError(f"groups must be an int >= 1 (kv heads after grouping, e.g. 4), "
                              f"got {g!r}")


@dataclass(frozen=True)
class GroupMaps:
    """The fitted state of a site: the maps the op applies, and how they were chosen."""

    wq: torch.Tensor | None      # [H, D, D]: queries of head h → q @ wq[h]
    wo: torch.Tensor | None      # [H, Dv, Dv]: outputs of head h → o @ wo[h] + bo[h]
    bo: torch.Tensor | None      # [H, 1, Dv]
    kind: str                    # "mean pooling", "output map", "key + output maps"
    err_mean: float              # relative squared output error on calibration, mean pooling
    err_fit: float               # ... with the chosen maps

    def describe(self) -> str:
        """E.g. ``key + output maps (calibration output error 0.31 -> 0.12)``."""
        if self.kind == "mean pooling":
            return f"mean pooling (calibrated maps did not help: error {self.err_mean:.3g})"
        return (f"{self.kind} fitted (calibration output error {self.err_mean:.3g} -> "
                f"{self.err_fit:.3g})")


# -- the op ----------------------------------------------------------------------------------------


def pool_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` → ``[B, groups, L, D]``: the mean of each run of ``Hkv / groups``
    consecutive heads.
    """
    b, hkv, n, d = x.shape
    if hkv % groups:
        raise ValueError(f"groups={groups} does not divide the {hkv} kv heads")
    return x.reshape(b, groups, hkv // groups, n, d).mean(2)


@torch.library.custom_op("attnopt::group_kv", mutates_args=())
def group_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    wq: torch.Tensor | None,
    wo: torch.Tensor | None,
    bo: torch.Tensor | None,
    groups: int,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention with the kv heads mean-pooled into ``groups`` heads, and optional fitted maps.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0`` and ``Hkv % groups == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``.
        wq: None or ``[H, D, D]``: the queries of head h become ``q @ wq[h]``.
        wo: None or ``[H, Dv, Dv]``, bo: None or ``[H, 1, Dv]``: the output of head h becomes
            ``o @ wo[h] + bo[h]``.
        groups: kv heads after pooling.
        is_causal: key j is visible to query i only when ``j <= i``.
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous.
    """
    _sparse.check_operands(q, k, v, attn_mask)
    if wq is not None:
        q = q @ wq.to(q.dtype)
    out = attention(q, pool_heads(k, groups), pool_heads(v, groups), attn_mask, is_causal, scale)
    if wo is not None:
        out = out @ wo.to(out.dtype)
    if bo is not None:
        out = out + bo.to(out.dtype)
    return out.contiguous()


@group_kv.register_fake
def _(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def reference_group_kv(q, k, v, attn_mask, wq, wo, bo, groups: int, is_causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`group_kv`: pooled heads by an explicit loop, k / v repeated to
    every query head, dense attention, maps applied per head.
    """
    hkv = k.shape[1]
    size = hkv // groups
    kp = torch.stack([k[:, g * size:(g + 1) * size].sum(1) / size for g in range(groups)], 1)
    vp = torch.stack([v[:, g * size:(g + 1) * size].sum(1) / size for g in range(groups)], 1)
    if wq is not None:
        q = torch.stack([q[:, h] @ wq[h] for h in range(q.shape[1])], 1)
    out = reference_attention(q, kp, vp, attn_mask, is_causal, scale)
    if wo is not None:
        out = torch.stack([out[:, h] @ wo[h] for h in range(out.shape[1])], 1)
    if bo is not None:
        out = out + bo
    return out


# -- calibration -----------------------------------------------------------------------------------


def _solve(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``gram⁻¹ cross`` with a ridge relative to the mean diagonal (batched over the first dim)."""
    n = gram.shape[-1]
    ridge = RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(n, dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge[..., None, None] * eye, cross)


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def fit_key_maps(samples: list[dict[str, Any]], groups: int) -> torch.Tensor:
    """Per query head ``wq [H, D, D]`` from the per-kv-head key regressions (module docstring)."""
    q0, k0 = samples[0]["q"], samples[0]["k"]
    h, hkv, d = q0.shape[1], k0.shape[1], k0.shape[-1]
    gram = torch.zeros(hkv, d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(hkv, d + 1, d, dtype=torch.float64)
    for s in samples:
        k = s["k"].double().cpu()
        keep = _sparse.valid_keys(s.get("mask"), k.shape[0], k.shape[2])
        pooled = pool_heads(k, groups).repeat_interleave(hkv // groups, 1)   # [B, Hkv, Lk, D]
        x = _with_one(pooled) * keep[:, None, :, None]
        gram += torch.einsum("bhni,bhnj->hij", x, x)
        cross += torch.einsum("bhni,bhnj->hij", x, k * keep[:, None, :, None])
    a = _solve(gram, cross)[:, :d]                                           # [Hkv, D, D]
    return a.transpose(-2, -1).repeat_interleave(h // hkv, 0).float()


def fit_output_maps(samples: list[dict[str, Any]], groups: int, wq: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head ``wo [H, Dv, Dv]``, ``bo [H, 1, Dv]``: grouped output → exact output."""
    h, dv = samples[0]["q"].shape[1], samples[0]["v"].shape[-1]
    gram = torch.zeros(h, dv + 1, dv + 1, dtype=torch.float64)
    cross = torch.zeros(h, dv + 1, dv, dtype=torch.float64)
    for rows in _grouped_outputs(samples, groups, wq):
        x = _with_one(rows[0]) * rows[2]
        gram += torch.einsum("bhni,bhnj->hij", x, x)
        cross += torch.einsum("bhni,bhnj->hij", x, rows[1] * rows[2])
    w = _solve(gram, cross)
    return w[:, :dv].float(), w[:, dv:].float()


def _grouped_outputs(samples, groups, wq):
    """Per sample: (grouped output, exact output, row weights ``[B, 1, Lq, 1]``), float64."""
    for s in samples:
        q, k, v = (s[n].float().cpu() for n in ("q", "k", "v"))
        mask = s.get("mask")
        mask = None if mask is None else mask.cpu()
        o = group_kv(q, k, v, mask, wq, None, None, groups, bool(s["causal"]), float(s["scale"]))
        rows = _sparse.valid_query_rows(mask, q.shape[0], q.shape[2], k.shape[2])
        yield (o.double(), s["out"].double().cpu(), rows)


def output_error(samples, groups: int, wq, wo, bo) -> float:
    """Squared output error over valid rows / squared exact output, on ``samples``."""
    num = den = 0.0
    for o, out, rows in _grouped_outputs(samples, groups, wq):
        if wo is not None:
            o = o @ wo.double() + bo.double()
        num += float((((o - out) ** 2) * rows).sum())
        den += float(((out ** 2) * rows).sum())
    return num / max(den, 1e-30)


def fit_group_maps(samples: list[dict[str, Any]], groups: int) -> GroupMaps:
    """Fit both variants of the maps; keep the one with the lowest calibration output error."""
    with torch.no_grad():
        base = output_error(samples, groups, None, None, None)
        wq = fit_key_maps(samples, groups)
        options = [GroupMaps(None, None, None, "mean pooling", base, base)]
        for kind, w in (("output map", None), ("key + output maps", wq)):
            wo, bo = fit_output_maps(samples, groups, w)
            options.append(GroupMaps(w, wo, bo, kind, base,
                                     output_error(samples, groups, w, wo, bo)))
    return min(options, key=lambda m: m.err_fit)


# -- the implementation ----------------------------------------------------------------------------


@register(GroupKV)
class GroupKVImpl:
    """Emits ``torch.ops.attnopt.group_kv`` on sites whose kv heads can be grouped."""

    def can_apply(self, config: GroupKV, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if not site.heads or not site.kv_heads:
            return ("grouping kv heads needs the site's head layout (heads are folded into the "
                    "batch)")
        if config.groups >= site.kv_heads:
            return (f"groups={config.groups} is not fewer than the site's {site.kv_heads} kv "
                    "heads: nothing to group")
        if site.kv_heads % config.groups:
            return (f"groups={config.groups} does not divide the site's {site.kv_heads} kv heads; "
                    f"try a divisor of {site.kv_heads}")
        return None

    def static_dims(self, config: GroupKV, site: AttentionSite) -> tuple[str, ...]:
        """Head counts and head dims stay at their example sizes (groups and maps depend on
        them; see ``passes/static_sizes``).
        """
        return ("heads", "kv_heads", "head_dim", "value_dim")

    def wants_fit(self, config: GroupKV, calibration_given: bool) -> bool:
        """Fit maps only on calibration data; without it, mean pooling only."""
        return calibration_given

    def fit(self, config: GroupKV, site: AttentionSite, samples: list[dict[str, Any]]
            ) -> GroupMaps | None:
        """Closed-form key / output maps on ``samples`` (see the module docstring)."""
        if not samples:
            return None
        return fit_group_maps(samples, config.groups)

    def emit(self, config: GroupKV, graph: Graph, ops: SiteOperands, site: AttentionSite) -> Node:
        maps = ops.state if isinstance(ops.state, GroupMaps) else None
        tensors = {"wq": maps.wq, "wo": maps.wo, "bo": maps.bo} if maps else {}
        nodes = {key: None if tensors.get(key) is None else
                 buffer_node(graph, site, f"attnopt_groupkv_{site.index}_{key}", tensors[key])
                 for key in ("wq", "wo", "bo")}
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.group_kv.default,
            (ops.q, ops.k, ops.v, ops.mask, nodes["wq"], nodes["wo"], nodes["bo"], config.groups,
             ops.causal, scale),
        )

    def density(self, config: GroupKV, site: AttentionSite, state: GroupMaps | None = None
                ) -> float:
        """Every query-key pair is still computed: 1.0 (the saving is the kv cache, see note)."""
        return 1.0

    def describe_state(self, config: GroupKV, site: AttentionSite, state: GroupMaps | None
                       ) -> str:
        """The report note, e.g. ``kv heads 12 -> 6; mean pooling (no calibration)``."""
        how = state.describe() if isinstance(state, GroupMaps) else "mean pooling (no calibration)"
        return f"kv heads {site.kv_heads} -> {config.groups}; {how}"


# -- ONNX ------------------------------------------------------------------------------------------


def _lower(q, k, v, attn_mask, wq, wo, bo, groups: int, is_causal: bool, scale: float, fused):
    from onnxscript import ir
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    hkv = ox.static(k, 1, "kv-head count", who="group_kv")

    def pool(x):  # [B, Hkv, L, D] → [B, G, L, D]
        shape = op.Concat(op.Shape(x, start=0, end=1), ox.ints(groups, hkv // groups, -1),
                          op.Shape(x, start=3, end=4), axis=0)
        out = op.ReduceMean(op.Reshape(x, shape), ox.ints(2), keepdims=0)
        out.shape = ir.Shape([x.shape[0], groups, x.shape[2], x.shape[3]])
        out.dtype = x.dtype
        return out

    if wq is not None:
        q2 = op.MatMul(q, op.CastLike(wq, q))
        q2.shape, q2.dtype = q.shape, q.dtype
        q = q2
    out = fused(q, pool(k), pool(v), attn_mask, is_causal, scale)
    if wo is not None:
        out = op.MatMul(out, op.CastLike(wo, out))
    if bo is not None:
        out = op.Add(out, op.CastLike(bo, out))
    return out


@translation_on_exact(torch.ops.attnopt.group_kv.default)
def group_kv_on(exact):
    """:func:`group_kv_onnx` with ``exact`` for the attention over the pooled heads."""

    def lower(q, k, v, attn_mask, wq, wo, bo, groups: int = 1, is_causal: bool = False,
              scale: float = 1.0):
        return _lower(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale, exact)

    return lower


@onnx_translation(torch.ops.attnopt.group_kv.default, "onnx")
def group_kv_onnx(q, k, v, attn_mask, wq, wo, bo, groups: int = 1, is_causal: bool = False,
                  scale: float = 1.0):
    """Pool k / v (``Reshape`` + ``ReduceMean``), apply the maps, standard ``Attention`` with
    ``G`` kv heads.
    """
    return _lower(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale, attention_onnx)


@onnx_translation(torch.ops.attnopt.group_kv.default, "onnxruntime")
def group_kv_ort(q, k, v, attn_mask, wq, wo, bo, groups: int = 1, is_causal: bool = False,
                 scale: float = 1.0):
    """As :func:`group_kv_onnx`, through the contrib attention ops (``GroupQueryAttention`` for
    causal unmasked sites, ``MultiHeadAttention`` otherwise).
    """
    return _lower(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale, attention_ort)
