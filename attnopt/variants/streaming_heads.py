"""Streaming heads (DuoAttention): retrieval heads keep full causal attention, the other heads see
attention sinks + a recent window; which heads are which is calibrated per site.

Head decision per kv head: in a GQA model the query heads of one kv head share k / v, so they
share the decision (a kv head is either fully cached or sink + window cached); only then can the
cache of a streaming kv head shrink. ``full_fraction`` is therefore a fraction of *kv* heads,
rounded to the nearest count (at least one full kv head when ``full_fraction > 0``): SmolLM2's
3 kv heads with 0.25 give one full kv head (1/3 of the heads). The report gives the exact
fraction and the full heads per site.

Calibration (``fit``), two rankings of the kv heads; the ``round(full_fraction · Hkv)`` kv heads
ranked highest keep full attention:
  * ``ranking="mass"`` (the cheap proxy of DuoAttention): the attention probability mass that
    exact causal attention puts *outside* sinks + window on the calibration samples, averaged
    over its query heads and all valid queries. Computed one query block at a time (never the
    N×N scores of all heads at once).
  * ``ranking="output"`` (DuoAttention's gate objective, solved per layer): DuoAttention mixes
    each head's outputs as ``α_h O_full + (1 - α_h) O_stream`` and trains the gates ``α`` to
    match full attention under an L1 penalty. For one layer's attention output that objective,
    ``Σ_h ||(1 - α_h)(O_stream,h - O_full,h)||² + λ Σ_h α_h``, has the closed form
    ``α_h = max(0, 1 - λ / (2 E_h))`` with ``E_h`` the squared error of streaming head ``h``: the
    gates open in the order of ``E_h``, so ranking by the relative error
    ``E_h / ||O_full,h||²`` on the calibration samples and keeping the top fraction is its
    solution at a given budget. DuoAttention optimises the gates end to end, through the model
    (a distillation loss on the last hidden states); that is not implemented.

The op ``torch.ops.attnopt.streaming_heads`` takes the full-head mask as a tensor input (a buffer
of the rewritten module): full heads run through SDPA (``attnopt.attention``, causal), streaming
heads through the blocked streaming kernel (``attnopt.streaming``); no N×N tensor for the
streaming heads. ONNX (both targets): the head mask is a constant, so the lowering gathers each
head group, runs the fused lowering of the target on the full heads and the streaming lowering on
the others, and restores head order with one ``Gather`` (head indices computed in the graph from
the flags and the static count ``n_full``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnopt.errors import ConfigError, ExportError
from attnopt.export._registry import onnx_translation, translation_on_exact
from attnopt.variants import _sparse
from attnopt.variants._base import SiteOperands, Variant, buffer_node, register
from attnopt.variants.fused import attention, attention_onnx, attention_ort
from attnopt.variants.streaming import streaming, streaming_onnx, streaming_pairs, streaming_pattern

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite

#: where ``full_fraction`` is counted: per site, or over every site of the model.
SCOPES = ("site", "model")

#: how the kv heads are ranked for full attention (see the module docstring).
RANKINGS = ("mass", "output")

#: bytes of one query block's scores in the calibration proxy.
PROXY_BYTES = 1 << 25


@dataclass(frozen=True, kw_only=True)
class StreamingHeads(Variant):
    """Per-head full or sink + window attention, chosen on calibration data (DuoAttention).

    Attributes:
        sinks: leading keys every streaming head sees (e.g. 4).
        window: the last ``window`` keys (the query's own included) a streaming head sees.
        full_fraction: fraction of kv heads kept as full (retrieval) heads, in [0, 1].
        scope: ``"site"``: each site keeps ``full_fraction`` of its own kv heads;
            ``"model"`` (DuoAttention): ``full_fraction`` of all kv heads of all the sites this
            config applies to, ranked together by the proxy, so layers that need full heads get
            more of them and others none.
        ranking: ``"mass"``: attention mass outside sinks + window (the cheap proxy);
            ``"output"``: relative error of the streaming output (DuoAttention's gate
            objective, per layer).
    """

    name = "streaming_heads"
    exact = False

    sinks: int = 4
    window: int = 256
    full_fraction: float = 0.25
    scope: str = "site"
    ranking: str = "mass"

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ConfigError(f"sinks must be an int >= 0 (e.g. 4), got {self.sinks!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(f"window must be a positive int (e.g. 256), got {self.window!r}")
        f = self.full_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"full_fraction must be a number in [0, 1] (e.g. 0.25), got {f!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")


@dataclass(frozen=True)
class HeadPlan:
    """The fitted state of a site: which kv heads are full, and the proxy score of each."""

    full: tuple[bool, ...]       # per kv head
    mass: tuple[float, ...]      # per kv head: the ranking score (higher: keep full)
    ranking: str = "mass"        # what ``mass`` holds (``RANKINGS``)

    def describe(self, group: int) -> str:
        """E.g. ``full heads [0, 1, 2] (kv 0); mass outside sinks+window [0.31, 0.02, 0.05]``."""
        heads = [h for kv, f in enumerate(self.full) if f for h in range(kv * group,
                                                                           (kv + 1) * group)]
        kv = [i for i, f in enumerate(self.full) if f]
        mass = ", ".join(f"{m:.3f}" for m in self.mass)
        what = ("mass outside sinks+window" if self.ranking == "mass"
                else "relative error of streaming")
        return f"full heads {heads} (kv {kv}); {what} [{mass}]"


# -- the op ----------------------------------------------------------------------------------------


def _query_heads(kv: torch.Tensor, group: int) -> torch.Tensor:
    return (kv[:, None] * group + torch.arange(group, device=kv.device)).flatten()


def _head_subset(mask: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.dim() < 4 or mask.shape[1] == 1:
        return mask
    return mask.index_select(1, idx.to(mask.device))


@torch.library.custom_op("attnopt::streaming_heads", mutates_args=())
def streaming_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    full: torch.Tensor,
    n_full: int,
    sinks: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention, full on the kv heads where ``full`` is True, sinks + window elsewhere.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``.
        full: bool ``[Hkv]``: True = the kv head (and its query heads) keeps full attention.
        n_full: the number of True flags (static, so that exported graphs have static head
            counts per group).
        sinks, window: the streaming pattern (see ``attnopt.streaming``).
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous.
    """
    _sparse.check_operands(q, k, v, attn_mask)
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    if full.shape != (hkv,):
        raise ValueError(f"full must be [{hkv}] (one flag per kv head), got {tuple(full.shape)}")
    group = h // hkv
    flags = full.to(device="cpu", dtype=torch.bool)
    if int(flags.sum()) != n_full:
        raise ValueError(f"full has {int(flags.sum())} True flags, n_full says {n_full}")
    out = q.new_empty((b, h, lq, v.shape[-1]))
    for keep, run in ((True, lambda qq, kk, vv, m: attention(qq, kk, vv, m, True, scale)),
                      (False, lambda qq, kk, vv, m: streaming(qq, kk, vv, m, sinks, window,
                                                              scale))):
        kv = (flags == keep).nonzero().flatten().to(q.device)
        if kv.numel() == 0:
            continue
        qh = _query_heads(kv, group)
        if kv.numel() == hkv:
            return run(q, k, v, attn_mask).contiguous()
        out[:, qh] = run(q.index_select(1, qh), k.index_select(1, kv), v.index_select(1, kv),
                         _head_subset(attn_mask, qh))
    return out


@streaming_heads.register_fake
def _(q, k, v, attn_mask, full, n_full, sinks, window, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def head_pattern(full: torch.Tensor, heads: int, lq: int, lk: int, sinks: int,
                 window: int) -> torch.Tensor:
    """The ``[H, Lq, Lk]`` bool pattern (True = computed) for kv-head flags ``full``."""
    group = heads // full.shape[0]
    per_head = full.to(torch.bool).repeat_interleave(group)[:, None, None]
    causal = streaming_pattern(lq, lk, lk, lk)             # every j <= i
    return torch.where(per_head, causal, streaming_pattern(lq, lk, sinks, window))


def reference_streaming_heads(q, k, v, attn_mask, full, sinks: int, window: int,
                              scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`streaming_heads` (without ``n_full``): dense attention under the
    per-head pattern.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = head_pattern(full, q.shape[1], q.shape[-2], k.shape[-2], sinks, window)
    return _sparse.reference_sparse(q, k, v, attn_mask, allowed.to(q.device), scale)


# -- calibration: the proxy ------------------------------------------------------------------------


def outside_mass(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 sinks: int, window: int) -> torch.Tensor:
    """Per query head, the mean causal attention mass outside sinks + window: ``[H]``.

    Means over batch and queries (queries whose every key is masked count 0). Scores are built
    one query block at a time (``PROXY_BYTES``), never ``[B, H, L, L]`` at once.
    """
    q, k = q.float(), k.float()
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = h // hkv
    m = _sparse.check_operands(q, k, k, mask)
    rows = max(1, PROXY_BYTES // max(1, 4 * b * h * lk))
    total = torch.zeros(h, dtype=torch.float64)
    for i0 in range(0, lq, rows):
        i1 = min(lq, i0 + rows)
        qb = q[:, :, i0:i1].reshape(b, hkv, group * (i1 - i0), d)
        s = (qb @ k.transpose(-2, -1)).reshape(b, h, i1 - i0, lk) * scale
        if m is not None:
            mb = m[:, :, i0:i1] if m.shape[2] != 1 else m
            s = s.masked_fill(~mb, float("-inf")) if mb.dtype == torch.bool else s + mb.float()
        i = torch.arange(i0, i1)[:, None]
        j = torch.arange(lk)[None, :]
        s = s.masked_fill(j > i, float("-inf"))
        p = s.softmax(-1).nan_to_num(nan=0.0)
        inside = (j < sinks) | (i - j < window)
        total += p.masked_fill(inside, 0.0).sum((-1, -2)).sum(0).double()
    return (total / (b * lq)).float()


def streaming_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, out: torch.Tensor, scale: float, sinks: int,
                    window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head, the squared error of the streaming output against the exact ``out`` and
    the squared norm of ``out``, summed over valid query rows: two ``[H]`` float64 tensors.
    """
    with torch.no_grad():
        approx = streaming(q, k, v, mask, sinks, window, scale).double().cpu()
    exact = out.double().cpu()
    rows = _sparse.valid_query_rows(mask, q.shape[0], q.shape[2], k.shape[2])
    err = (((approx - exact) ** 2) * rows).sum((0, 2, 3))
    return err, ((exact ** 2) * rows).sum((0, 2, 3))


def choose_full(mass_kv: torch.Tensor, full_fraction: float) -> tuple[bool, ...]:
    """The ``round(full_fraction · Hkv)`` kv heads with the most mass (at least one if > 0)."""
    hkv = mass_kv.shape[0]
    n = math.floor(full_fraction * hkv + 0.5)
    if full_fraction > 0:
        n = max(1, n)
    chosen = set(torch.argsort(mass_kv, descending=True, stable=True)[:n].tolist())
    return tuple(i in chosen for i in range(hkv))


# -- the implementation ----------------------------------------------------------------------------


@register(StreamingHeads)
class StreamingHeadsImpl:
    """Emits ``torch.ops.attnopt.streaming_heads`` on causal self-attention sites."""

    def can_apply(self, config: StreamingHeads, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if site.kind != "self":
            return "streaming heads are for causal self attention; this is cross attention"
        if not _sparse.site_is_causal(site):
            return (f"streaming heads (sinks + recent window) are causal and this site is "
                    f"bidirectional (mask: {site.mask}); use SlidingWindow for encoders")
        if not site.heads or not site.kv_heads:
            return "streaming heads need the site's head layout (heads are folded into the batch)"
        return None

    def fit(self, config: StreamingHeads, site: AttentionSite, samples: list[dict[str, Any]]
            ) -> HeadPlan:
        """Rank kv heads on ``samples`` by ``config.ranking`` (see the module docstring)."""
        hkv = site.kv_heads
        mass = torch.zeros(hkv)
        if config.ranking == "output" and samples:
            err = norm = 0.0
            for smp in samples:
                e, n = streaming_error(smp["q"], smp["k"], smp["v"], smp.get("mask"), smp["out"],
                                       float(smp["scale"]), config.sinks, config.window)
                err, norm = err + e, norm + n
            mass = (err / norm.clamp_min(1e-30)).float().reshape(hkv, -1).mean(1)
        else:
            for smp in samples:
                with torch.no_grad():
                    per_head = outside_mass(smp["q"], smp["k"], smp.get("mask"),
                                            float(smp["scale"]), config.sinks, config.window)
                mass += per_head.reshape(hkv, -1).mean(1) / len(samples)
        return HeadPlan(full=choose_full(mass, config.full_fraction),
                        mass=tuple(float(x) for x in mass), ranking=config.ranking)

    def fit_jointly(self, config: StreamingHeads, states: dict[int, HeadPlan]
                    ) -> dict[int, HeadPlan]:
        """``scope="model"``: re-choose the full heads of every site fitted with ``config``
        together, the ``round(full_fraction · total kv heads)`` with the most mass overall.
        """
        if config.scope != "model" or not states:
            return states
        keys = [(index, h) for index in sorted(states) for h in range(len(states[index].mass))]
        mass = torch.tensor([states[i].mass[h] for i, h in keys])
        chosen = dict(zip(keys, choose_full(mass, config.full_fraction)))
        return {index: HeadPlan(full=tuple(chosen[index, h] for h in range(len(plan.mass))),
                                mass=plan.mass, ranking=plan.ranking)
                for index, plan in states.items()}

    def emit(self, config: StreamingHeads, graph: Graph, ops: SiteOperands,
             site: AttentionSite) -> Node:
        plan = ops.state if isinstance(ops.state, HeadPlan) else None
        if plan is None:  # not fitted: no proxy data, every kv head full up to the fraction
            plan = HeadPlan(full=choose_full(-torch.arange(float(site.kv_heads)),
                                             config.full_fraction),
                            mass=(0.0,) * site.kv_heads)
        flags = buffer_node(graph, site, f"attnopt_heads_{site.index}_full",
                            torch.tensor(plan.full, dtype=torch.bool))
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.streaming_heads.default,
            (ops.q, ops.k, ops.v, ops.mask, flags, sum(plan.full), config.sinks, config.window,
             scale),
        )

    def density(self, config: StreamingHeads, site: AttentionSite,
                state: HeadPlan | None = None) -> float:
        """Pairs computed over the causal pairs of exact attention, averaged over heads."""
        lq, lk = site.q_len, site.kv_len
        if not (isinstance(lq, int) and isinstance(lk, int) and lq and lk):
            return 1.0
        stream = min(1.0, streaming_pairs(lq, lk, config.sinks, config.window)
                     / _sparse.exact_pairs(lq, lk, True))
        if state is None:
            n = sum(choose_full(torch.zeros(site.kv_heads or 1), config.full_fraction))
            frac = n / (site.kv_heads or 1)
        else:
            frac = sum(state.full) / len(state.full)
        return frac + (1 - frac) * stream

    def describe_state(self, config: StreamingHeads, site: AttentionSite,
                       state: HeadPlan | None) -> str | None:
        """The report note: which heads are full."""
        return state.describe(site.gqa_ratio or 1) if isinstance(state, HeadPlan) else None


# -- ONNX ------------------------------------------------------------------------------------------
#
# The flags are a module buffer, i.e. an initializer whose value the exporter attaches only after
# translation, so the head indices are computed in the graph: ``TopK`` of the flags with the static
# count ``n_full`` gives the full kv heads (static shapes for each group), ``Gather`` selects the
# group's heads, and an inverse permutation (``ScatterElements``) restores head order.


def _lower(q, k, v, attn_mask, full, n_full: int, sinks: int, window: int, scale: float, fused):
    from onnxscript import ir
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    heads, hkv = ox.static_dim(q, 1), ox.static_dim(k, 1)
    if heads is None or hkv is None:
        raise ExportError("streaming heads export needs static head counts (q and k axis 1)")
    group = heads // hkv

    def ints(a):
        return op.Constant(value=ir.tensor(np.asarray(a, dtype=np.int64)))

    def gather(x, idx, n):  # computed indices: state the static head count of the result
        out = op.Gather(x, idx, axis=1)
        out.shape = ir.Shape([x.shape[0], n, x.shape[2], x.shape[3]])
        out.dtype = x.dtype
        return out

    flags = op.Cast(full, to=ir.DataType.INT64)

    def run(keep: bool, n: int, fn):
        if n == hkv:
            return fn(q, k, v, attn_mask), ints(np.arange(heads))
        score = flags if keep else op.Sub(ints(1), flags)
        _, kv = op.TopK(score, ints([n]), axis=0, largest=1, sorted=1)       # [n]
        qh = op.Reshape(op.Add(op.Mul(op.Unsqueeze(kv, ints([1])), ints(group)),
                               ints(np.arange(group)[None, :])), ints([-1]))  # [n·group]
        m = attn_mask
        if m is not None and ox.rank(m) == 4 and ox.static_dim(m, 1) != 1:
            m = op.Gather(m, qh, axis=1)
        sub = (gather(q, qh, n * group), gather(k, kv, n), gather(v, kv, n))
        return fn(*sub, m), qh

    parts = []
    if n_full:
        parts.append(run(True, n_full, lambda a, b, c, m: fused(a, b, c, m, True, scale)))
    if n_full < hkv:
        parts.append(run(False, hkv - n_full, lambda a, b, c, m: streaming_onnx(
            a, b, c, m, sinks, window, scale)))
    if len(parts) == 1:
        return parts[0][0]
    order = op.Concat(*[qh for _, qh in parts], axis=0)                      # [H]
    inverse = op.ScatterElements(order, order, ints(np.arange(heads)), axis=0)
    return op.Gather(op.Concat(*[o for o, _ in parts], axis=1), inverse, axis=1)


@translation_on_exact(torch.ops.attnopt.streaming_heads.default)
def streaming_heads_on(exact):
    """:func:`streaming_heads_onnx` with ``exact`` for the full heads."""

    def lower(q, k, v, attn_mask, full, n_full: int, sinks: int = 4, window: int = 256,
              scale: float = 1.0):
        return _lower(q, k, v, attn_mask, full, n_full, sinks, window, scale, exact)

    return lower


@onnx_translation(torch.ops.attnopt.streaming_heads.default, "onnx")
def streaming_heads_onnx(q, k, v, attn_mask, full, n_full: int, sinks: int = 4,
                         window: int = 256, scale: float = 1.0):
    """Gather each head group; standard ``Attention`` on full heads, the block-wise streaming
    decomposition on the others; one ``Gather`` restores head order.
    """
    return _lower(q, k, v, attn_mask, full, n_full, sinks, window, scale, attention_onnx)


@onnx_translation(torch.ops.attnopt.streaming_heads.default, "onnxruntime")
def streaming_heads_ort(q, k, v, attn_mask, full, n_full: int, sinks: int = 4,
                        window: int = 256, scale: float = 1.0):
    """As :func:`streaming_heads_onnx`, the full heads through the contrib attention ops."""
    return _lower(q, k, v, attn_mask, full, n_full, sinks, window, scale, attention_ort)
