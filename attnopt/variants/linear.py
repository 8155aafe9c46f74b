"""Linear attention: canonical site → ``torch.ops.attnopt.linear_attention`` (φ(Q)(φ(K)ᵀV), O(N)).

``softmax(s·q kᵀ) v`` becomes ``φ(q) Σ_j φ(k_j)ᵀ v_j / φ(q) Σ_j φ(k_j)ᵀ`` with a non-negative
feature map φ (see ``_feature_maps``: elu+1, relu, performer, taylor, learned).

  * non-causal: ``KV = φ(K)ᵀ [V, 1]`` once (``[F, Dv + 1]`` per kv head), then ``φ(Q) KV``; the
    extra column of ones carries the normaliser through the same matmuls;
  * causal (Lightning Attention-2): the sequence is cut into blocks of ``block`` tokens; inside a
    block the masked quadratic form ``(φ(Q_b) φ(K_b)ᵀ ⊙ tril) [V_b, 1]``, across blocks the
    running state ``S_b = Σ_{b' < b} φ(K_b')ᵀ [V_b', 1]`` (an exclusive cumulative sum over block
    states). Time and memory are O(N): the torch implementation walks the sequence in chunks of
    whole blocks (features computed per chunk, state carried), so peak memory does not grow with N;
  * GQA: query heads are grouped onto their kv head (``[B, Hkv, G·L, F]``), no K/V repetition;
  * masks: only key-padding masks (a bool or additive float mask that varies along batch and
    keys only, broadcastable to ``[B, 1, 1, Lk]``). They become key weights ``w_j`` (0 for a
    masked key, ``exp(bias)`` for a finite additive key bias) multiplying ``φ(k_j)``, so masked
    keys drop out of both the numerator and the normaliser. Other masks and biases are refused
    with a reason;
  * cross attention: non-causal only (causal needs ``Lq == Lk``).

The ONNX lowering (targets ``onnx`` and ``onnxruntime``) is a decomposition into standard opset-23
ops: ONNX ``LinearAttention`` exists only at opset 27 (rejected by ORT 1.31) and
``com.microsoft.LinearAttention`` has no feature map nor normaliser. The causal form pads the
sequence to a multiple of the block inside the graph, reshapes into blocks, and replaces the
running state by a ``CumSum(exclusive=1)`` over block states, so any sequence length works.

Calibration (``fit``): per-head projections in front of the map are trained so that the linear
attention's output matches the site's exact output on calibration data (attention transfer,
Hedgehog / LoLCATs). ``learned`` needs it; the fixed maps can use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from attnopt._match.masks import HARD_FILL
from attnopt.errors import ConfigError, ExportError, VariantNotApplicableError
from attnopt.export import _onnx_ops as ox
from attnopt.export._onnx_ops import const as _const
from attnopt.export._onnx_ops import ints as _ints
from attnopt.export._onnx_ops import ir, op, static
from attnopt.export._registry import onnx_translation
from attnopt.variants import _feature_maps as fm
from attnopt.variants._base import SiteOperands, Variant, buffer_node, register
from attnopt.variants._feature_maps import FeatureMap, FittedMaps, MapParams

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite

log = logging.getLogger("attnopt")

#: working-set budget of one chunk of the torch implementation (features, block states, scores).
CHUNK_BYTES = 24 << 20
#: ... but never fewer tokens than this per chunk (tiny chunks make tiny, slow matmuls).
MIN_CHUNK = 256
#: on CUDA: chunks of up to this many bytes (a few chunks at 64k tokens) and causal blocks of at
#: least this many tokens (fewer block states to write and prefix-sum; bigger matmuls).
CUDA_CHUNK_BYTES = 2 << 30
CUDA_MIN_BLOCK = 256
#: the normaliser is clamped to this (all weights are >= 0, so |num| <= den·max|v| always).
TINY = torch.finfo(torch.float32).tiny
#: a site whose feature dimension times value dimension exceeds this is refused (state too big).
MAX_STATE = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Linear(Variant):
    """Linear attention ``φ(Q)(φ(K)ᵀV)`` with a non-negative feature map φ.

    Attributes:
        feature_map: ``"elu"`` (elu+1), ``"relu"``, ``"performer"`` (positive orthogonal random
            features), ``"taylor"`` (2nd-order expansion of exp, as in Based) or ``"learned"``
            (per-head linear layer + softmax over features, fitted on calibration data).
        block: block size of the causal computation (quadratic inside a block, running state
            across blocks); does not change the result, only speed and memory.
        features: performer: number of random features (default 4·head_dim); learned: size m of
            the per-head projection (F = 2m, default head_dim); elu / relu / taylor: size of the
            projection fitted on calibration data (default head_dim; without calibration the
            map takes q and k unprojected).
        seed: seed of the performer features and of random initialisations.
        steps: optimisation steps of the calibration fit per site.
        lr: learning rate (Adam) of the calibration fit.
    """

    name = "linear"
    exact = False

    feature_map: FeatureMap = "elu"
    block: int = 64
    features: int | None = None
    seed: int = 0
    steps: int = 300
    lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.feature_map not in fm.FEATURE_MAPS:
            raise ConfigError(f"feature_map must be one of {fm.FEATURE_MAPS}, "
                              f"got {self.feature_map!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ConfigError(f"block must be a positive int (e.g. 64), got {self.block!r}")
        if self.features is not None and (not isinstance(self.features, int)
                                          or isinstance(self.features, bool)
                                          or self.features < 1):
            raise ConfigError(f"features must be None or a positive int, got {self.features!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ConfigError(f"steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")


# -- the op -------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::linear_attention", mutates_args=())
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    wq: torch.Tensor | None,
    bq: torch.Tensor | None,
    wk: torch.Tensor | None,
    bk: torch.Tensor | None,
    omega: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    feature_map: str,
    block: int,
) -> torch.Tensor:
    """Linear attention on canonical operands.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, or a key-padding mask: bool (True = attend) or additive float,
            broadcastable to ``[B, 1, 1, Lk]`` (or ``[B, H, 1, Lk]`` when ``H == Hkv``).
        wq, bq: query projection ``[H, D, m]`` / ``[H, m]`` in front of the map, or None.
        wk, bk: key projection ``[Hkv, D, m]`` / ``[Hkv, m]``, or None.
        omega: performer random features ``[m, M]`` (None for the other maps).
        is_causal: key j is visible to query i only when ``j <= i`` (needs ``Lq == Lk``).
        scale: the softmax scale (applied as ``√scale`` to q and k by the exp-like maps).
        feature_map: one of ``elu, relu, performer, taylor, learned``.
        block: causal block size.

    Returns:
        ``[B, H, Lq, Dv]`` in q's dtype.
    """
    p = MapParams(feature_map, scale, wq, bq, wk, bk, omega)
    kw = key_weights(attn_mask, q.shape[1], k.shape[1], k.shape[2])
    if q.is_cuda:
        block = max(block, CUDA_MIN_BLOCK)
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad(), _tf32_matmuls(half):
        out = linear_attention_torch(q, k, v, kw, p, is_causal, block)
    return out.to(q.dtype)


@contextlib.contextmanager
def _tf32_matmuls(on: bool):
    """TF32 CUDA matmuls inside (restored after): for fp16 / bf16 inputs, whose own rounding is
    coarser than TF32's, the fp32 matmuls of the kernel then run on tensor cores.
    """
    m = torch.backends.cuda.matmul
    try:
        old = m.allow_tf32 if on else None
    except RuntimeError:  # the TF32 state was set through the newer ``fp32_precision`` API
        old = None
    if old is None:
        yield
        return
    m.allow_tf32 = True
    try:
        yield
    finally:
        m.allow_tf32 = old


@linear_attention.register_fake
def _(q, k, v, attn_mask, wq, bq, wk, bk, omega, is_causal, scale, feature_map, block):
    if attn_mask is not None:
        _check_mask_shape(attn_mask.shape, q.shape[1], k.shape[1])
    # Per-head projections [H, D, m] and random features [D, F] fix these sizes: a dynamic head
    # count or head dim becomes static when the rewritten graph is exported again.
    for x, w in ((q, wq), (k, wk)):
        if w is not None:
            torch._check(x.shape[1] == w.shape[0])
            torch._check(x.shape[3] == w.shape[1])
    if omega is not None and wq is None:
        torch._check(q.shape[3] == omega.shape[0])
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _check_mask_shape(shape: torch.Size | tuple, heads: int, kv_heads: int) -> None:
    dims = (1,) * (4 - len(shape)) + tuple(shape)
    if len(dims) > 4 or dims[2] != 1 or (dims[1] != 1 and not (dims[1] == heads == kv_heads)):
        raise VariantNotApplicableError(
            f"linear attention takes only key-padding masks broadcastable to [B, 1, 1, Lk]; got a "
            f"mask of shape {tuple(shape)} (a mask that varies along queries or per query head "
            "cannot be applied to the factorised scores): use an exact variant for this site")


def key_weights(mask: torch.Tensor | None, heads: int, kv_heads: int, kv_len: int
                ) -> torch.Tensor | None:
    """Key weights ``[B | 1, Hkv | 1, Lk, 1]`` from a key-padding mask (None: no mask).

    Bool masks give 1 / 0; additive float masks give ``exp(m − max_j m)`` (0 at ``-inf`` or very
    negative fills), which reproduces a key-only bias exactly in ``softmax``'s factorisation.
    """
    if mask is None:
        return None
    _check_mask_shape(mask.shape, heads, kv_heads)
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:
        w = m.float()
    else:
        m = m.float()
        top = m.amax(-1, keepdim=True).clamp_min(HARD_FILL)
        w = torch.exp(m - top)
    return w.expand(*w.shape[:-1], kv_len).transpose(-1, -2)


# -- torch implementation ------------------------------------------------------------------------


def linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_weight: torch.Tensor | None, p: MapParams, causal: bool,
                           block: int) -> torch.Tensor:
    """The fast implementation (differentiable in ``p``'s projections; used by ``fit``).

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``.
        key_weight: ``[B | 1, Hkv | 1, Lk, 1]`` from :func:`key_weights`, or None.
        p: the feature map.
        causal: causal (block-wise) or not.
        block: causal block size.

    Returns:
        ``[B, H, Lq, Dv]`` in fp32.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if h % hkv:
        raise VariantNotApplicableError(f"query heads {h} are not a multiple of kv heads {hkv}")
    if causal and lq != lk:
        raise VariantNotApplicableError(
            f"causal linear attention needs Lq == Lk (self attention), got {lq} and {lk}")
    fdim = p.feature_dim(d)
    shift = _key_shift(k, p, key_weight, fdim)
    if causal:
        return _causal(q, k, v, key_weight, p, shift, block, fdim)
    return _non_causal(q, k, v, key_weight, p, shift, fdim)


def _slice_w(kw: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    return None if kw is None else kw[:, :, s:e]


def _ones_col(v: torch.Tensor) -> torch.Tensor:
    """``[..., L, Dv]`` → ``[..., L, Dv + 1]`` fp32 with a last column of ones (the normaliser)."""
    return torch.cat([v.float(), v.new_ones((*v.shape[:-1], 1), dtype=torch.float32)], -1)


def _chunk_len(per_token: int, multiple: int, device: torch.device | None = None) -> int:
    """Tokens per chunk: within ``CHUNK_BYTES`` (``CUDA_CHUNK_BYTES`` on CUDA), at least
    ``MIN_CHUNK``, a multiple of ``multiple``.
    """
    budget = CUDA_CHUNK_BYTES if device is not None and device.type == "cuda" else CHUNK_BYTES
    n = max(MIN_CHUNK, budget // max(per_token, 1))
    return max(multiple, n // multiple * multiple)


def _key_shift(k: torch.Tensor, p: MapParams, kw: torch.Tensor | None, fdim: int
               ) -> torch.Tensor | None:
    if p.name != "performer":
        return None
    b, hkv, lk, _ = k.shape
    step = _chunk_len(4 * b * hkv * fdim * 2, 1)
    shifts = [fm.key_logit_max(k[:, :, s:s + step], p, _slice_w(kw, s, s + step))
              for s in range(0, lk, step)]
    return torch.stack(shifts).amax(0)


def _non_causal(q, k, v, kw, p, shift, fdim):
    b, h, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    per_token = 4 * b * (2 * h * fdim + 2 * hkv * fdim + 2 * h * (dv + 1))
    step = _chunk_len(per_token, 1, q.device)
    kv = None
    for s in range(0, lk, step):
        fk = fm.key_features(k[:, :, s:s + step], p, _slice_w(kw, s, s + step), shift)
        part = fk.transpose(-1, -2) @ _ones_col(v[:, :, s:s + step])   # [B, Hkv, F, Dv+1]
        kv = part if kv is None else kv + part
    out = q.new_empty((b, h, lq, dv), dtype=torch.float32)
    for s in range(0, lq, step):
        fq = fm.query_features(q[:, :, s:s + step], p)                  # [B, H, t, F]
        t = fq.shape[2]
        o = (fq.reshape(b, hkv, g * t, fdim) @ kv).view(b, h, t, dv + 1)
        _normalise_into(out[:, :, s:s + t], o, dv)
    return out


def _normalise_into(dst: torch.Tensor, o: torch.Tensor, dv: int) -> None:
    """``dst = numerator / normaliser`` from ``o = [num, den]`` (no temporary when not training)."""
    if o.requires_grad and torch.is_grad_enabled():
        dst.copy_(o[..., :dv] / o[..., dv:].clamp_min(TINY))
    else:
        torch.div(o[..., :dv], o[..., dv:].clamp_min(TINY), out=dst)


def _intra_mask(block: int, groups: int, device: torch.device) -> torch.Tensor:
    """``[G·C, C]`` float 0/1: row r (query r mod C of its block) sees keys ``<= r mod C``."""
    i = torch.arange(block, device=device)
    return (i[:, None] >= i[None, :]).float().repeat(groups, 1)


def _causal(q, k, v, kw, p, shift, block, fdim):
    b, h, n, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g, c = h // hkv, block
    e = dv + 1
    per_token = 4 * b * (3 * h * fdim + hkv * fdim + hkv * e + h * c + 3 * h * e
                         + 3 * hkv * fdim * e // c)
    step = _chunk_len(per_token, c, q.device)
    tri = _intra_mask(c, g, q.device) if g > 1 else None
    state = None                                                        # [B, Hkv, F, Dv+1]
    out = q.new_empty((b, h, n, dv), dtype=torch.float32)
    for s in range(0, n, step):
        fq = fm.query_features(q[:, :, s:s + step], p)                  # [B, H, t, F]
        fk = fm.key_features(k[:, :, s:s + step], p, _slice_w(kw, s, s + step), shift)
        v1 = _ones_col(v[:, :, s:s + step])
        t = fq.shape[2]
        pad = -t % c
        if pad:
            fq, fk, v1 = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v1))
        nb = (t + pad) // c
        # Flattened to 3-D batches of blocks: [B·Hkv·nb, G·C, F] (a query head group per row block).
        fq = fq.view(b, hkv, g, nb, c, fdim).transpose(2, 3).reshape(-1, g * c, fdim)
        fk = fk.view(-1, c, fdim)
        v1 = v1.view(-1, c, e)
        scores = torch.bmm(fq, fk.transpose(1, 2))                      # [., G·C, C]
        scores = scores.tril_() if tri is None else scores.mul_(tri)
        o = torch.bmm(scores, v1)                                       # intra-block
        kv = torch.bmm(fk.transpose(1, 2), v1).view(b, hkv, nb, fdim, e)
        # Exclusive prefix over blocks, starting from the carried state: S_b = S + Σ_{b'<b} KV_b'.
        first = kv.new_zeros((b, hkv, 1, fdim, e)) if state is None else state.unsqueeze(2)
        prefix = torch.cat([first, kv[:, :, :-1]], 2).cumsum_(2)
        state = prefix[:, :, -1] + kv[:, :, -1]
        o = o.baddbmm_(fq, prefix.view(-1, fdim, e))                    # inter-block
        o = o.view(b, hkv, nb, g, c, e).transpose(2, 3).reshape(b, h, nb * c, e)[:, :, :t]
        _normalise_into(out[:, :, s:s + t], o, dv)
    return out


# -- slow references (tests compare the fast implementation with them) ---------------------------


def _reference_features(q, k, attn_mask, p: MapParams):
    h, hkv = q.shape[1], k.shape[1]
    kw = key_weights(attn_mask, h, hkv, k.shape[2])
    kw = None if kw is None else kw.double()
    shift = fm.key_logit_max(k.double(), p, kw)
    fq = fm.query_features(q.double(), p)
    fk = fm.key_features(k.double(), p, kw, shift)
    return fq, fk.repeat_interleave(h // hkv, dim=1)


def reference_quadratic(q, k, v, attn_mask=None, p: MapParams | None = None,
                        is_causal: bool = False) -> torch.Tensor:
    """Slow reference, quadratic masked form: ``(φ(Q)φ(K)ᵀ ⊙ causal) V / rowsum`` in fp64."""
    p = p or MapParams("elu", q.shape[-1] ** -0.5)
    fq, fk = _reference_features(q, k, attn_mask, p)
    a = fq @ fk.transpose(-1, -2)
    if is_causal:
        a = a * torch.ones(a.shape[-2:], dtype=a.dtype).tril()
    v = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-300)


def reference_cumsum(q, k, v, attn_mask=None, p: MapParams | None = None) -> torch.Tensor:
    """Slow reference of the causal form as a recurrence: ``S_i = Σ_{j<=i} φ(k_j)ᵀ v_j`` (cumsum).

    Materialises ``[B, H, L, F, Dv]``: for small tests only.
    """
    p = p or MapParams("elu", q.shape[-1] ** -0.5)
    fq, fk = _reference_features(q, k, attn_mask, p)
    v = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    state = (fk.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)             # [B, H, L, F, Dv]
    z = fk.cumsum(2)                                                     # [B, H, L, F]
    num = (fq.unsqueeze(-2) @ state).squeeze(-2)
    den = (fq * z).sum(-1, keepdim=True)
    return num / den.clamp_min(1e-300)


# -- variant implementation ----------------------------------------------------------------------


def _performer_omega(config: Linear, in_dim: int) -> torch.Tensor:
    return fm.performer_omega(in_dim, config.features or 4 * in_dim, config.seed)


def _projection_dim(config: Linear, head_dim: int) -> int:
    if config.feature_map == "performer":
        return head_dim
    return config.features or head_dim


def map_params(config: Linear, scale: float, head_dim: int, state: FittedMaps | None,
               heads: int | None = None, kv_heads: int | None = None) -> MapParams:
    """The :class:`MapParams` a site uses: fitted projections, or the map's defaults.

    ``learned`` without a fit starts from its initialisation (identity projection,
    ``φ(x) = [softmax(√s·x), softmax(−√s·x)]``); it needs ``heads`` and ``kv_heads`` then.
    """
    wq = bq = wk = bk = None
    if state is not None:
        wq, bq, wk, bk = state.wq, state.bq, state.wk, state.bk
    elif config.feature_map == "learned":
        if heads is None or kv_heads is None:
            raise VariantNotApplicableError("the learned feature map needs the head layout")
        m = _projection_dim(config, head_dim)
        wq, bq = fm.initial_projection(heads, head_dim, m, config.seed)
        wk, bk = fm.initial_projection(kv_heads, head_dim, m, config.seed)
    in_dim = head_dim if wq is None else wq.shape[-1]
    omega = _performer_omega(config, in_dim) if config.feature_map == "performer" else None
    return MapParams(config.feature_map, scale, wq, bq, wk, bk, omega)


@register(Linear)
class LinearImpl:
    """Emits ``torch.ops.attnopt.linear_attention``; fits per-head projections on calibration."""

    def can_apply(self, config: Linear, site: AttentionSite) -> str | None:
        if not site.fusable:
            return site.reason
        if site.window is not None:
            return (f"the site has a local window ({site.window}); linear attention would "
                    "replace it by global attention")
        parts = set(site.mask_kinds) - {"causal", "padding"}
        if parts:
            return (f"linear attention supports only key-padding masks; this site has "
                    f"{site.mask!r} (a bias or a query-dependent mask cannot be applied to the "
                    "factorised scores)")
        if site.causal and (site.kind != "self" or site.q_len != site.kv_len):
            return ("causal linear attention needs self attention with Lq == Lk "
                    f"({site.kind}, Lq={site.q_len}, Lk={site.kv_len}); cross attention is "
                    "supported non-causal only")
        if config.feature_map == "learned" and (site.heads is None or site.kv_heads is None):
            return "the learned feature map is per head, and the site's head layout is unknown"
        if site.head_dim is None and config.feature_map in ("learned", "performer"):
            return f"the {config.feature_map} feature map needs the site's head dim"
        if site.head_dim is not None:
            d = _projection_dim(config, site.head_dim)
            fdim = fm.feature_dim(config.feature_map, d, config.features)
            dv = site.value_dim or site.head_dim
            if fdim * (dv + 1) > MAX_STATE:
                return (f"the {config.feature_map} map has {fdim} features at head dim {d}: the "
                        f"state ({fdim}x{dv + 1} per head) is too large; fit a smaller "
                        "projection (features=...) or choose another map")
        return None

    def static_dims(self, config: Linear, site: AttentionSite) -> tuple[str, ...]:
        """Dims that must keep their example size (see ``passes/static_sizes``).

        Fitted or learned maps hold per-head projections ``[H, D, m]``, performer's random
        features are ``[D, F]``, and the ONNX lowering reads heads and head / value dims as
        constants; with heads folded into the batch there is nothing to fix.
        """
        if site.heads is None:
            return ("head_dim",) if config.feature_map == "performer" else ()
        return ("heads", "kv_heads", "head_dim", "value_dim")

    def emit(self, config: Linear, graph: Graph, ops: SiteOperands, site: AttentionSite) -> Node:
        state = ops.state if isinstance(ops.state, FittedMaps) else None
        if config.feature_map == "learned" and state is None:
            log.warning("site %d (%s): the learned feature map was not fitted (no calibration "
                        "data); using its initialisation", site.index, site.location)
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        p = map_params(config, scale, site.head_dim, state, site.heads, site.kv_heads)
        tensors = {"wq": p.wq, "bq": p.bq, "wk": p.wk, "bk": p.bk, "omega": p.omega}
        nodes = {key: None if t is None else buffer_node(graph, site,
                                                          f"attnopt_linear_{site.index}_{key}",
                                                          t.float())
                 for key, t in tensors.items()}
        return graph.call_function(
            torch.ops.attnopt.linear_attention.default,
            (ops.q, ops.k, ops.v, ops.mask, nodes["wq"], nodes["bq"], nodes["wk"], nodes["bk"],
             nodes["omega"], ops.causal, scale, config.feature_map, config.block),
        )

    def density(self, config: Linear, site: AttentionSite) -> float:
        """Cost relative to dense attention at the site's sizes (FLOPs ratio, capped at 1).

        Linear attention computes no query-key pair explicitly (except inside causal blocks), so
        this is the equivalent density a cost model should use.
        """
        lq, lk, d = site.q_len, site.kv_len, site.head_dim
        if not (lq and lk and d):
            return 1.0
        dv = site.value_dim or d
        fdim = fm.feature_dim(config.feature_map, _projection_dim(config, d), config.features)
        dense = lq * lk * (d + dv)
        linear = (lq + lk) * fdim * (dv + 1)
        if site.causal:
            dense /= 2
            linear += lq * min(config.block, lk) * (fdim + dv + 1) / 2
        return float(min(1.0, linear / dense))

    def wants_fit(self, config: Linear, calibration_given: bool) -> bool:
        """Fixed maps (elu, relu, performer, taylor) work unfitted: they fit a projection only
        when calibration data is given; ``learned`` always fits (on the example inputs when
        there is no calibration data, which the report notes).
        """
        return calibration_given or config.feature_map == "learned"

    def fit(self, config: Linear, site: AttentionSite, samples: list[dict[str, Any]]
            ) -> FittedMaps | None:
        """Fit per-head projections (attention transfer) on ``samples``.

        Args:
            config: the variant.
            site: the site (for its location and head layout).
            samples: dicts with canonical ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``,
                ``v [B, Hkv, Lk, Dv]``, ``mask`` (None or key padding), ``causal``, ``scale`` and
                the exact output ``out [B, H, Lq, Dv]``, on calibration inputs.

        Returns:
            The fitted projections (reaching ``emit`` as ``ops.state``), or None when nothing can
            be fitted (no samples, zero steps, unknown head layout).
        """
        if not samples or config.steps == 0:
            return None
        if site.heads is None:
            log.warning("site %d (%s): head layout unknown, feature map not fitted",
                        site.index, site.location)
            return None
        q0, k0 = samples[0]["q"], samples[0]["k"]
        h, d, hkv = q0.shape[1], q0.shape[-1], k0.shape[1]
        scale = float(samples[0].get("scale") or d ** -0.5)
        m = _projection_dim(config, d)
        wq, wk = fm.pca_projections(samples, m, h, hkv, config.seed)
        p = MapParams(config.feature_map, scale, wq, torch.zeros(h, m), wk, torch.zeros(hkv, m),
                      _performer_omega(config, m) if config.feature_map == "performer" else None)
        prepared = [_prepare(s) for s in samples]

        def forward(params: MapParams, s: dict[str, Any]) -> torch.Tensor:
            return linear_attention_torch(s["q"], s["k"], s["v"], s["kw"], params, s["causal"],
                                          config.block)

        return fm.fit_projections(p, prepared, forward, steps=config.steps, lr=config.lr,
                                  desc=f"fit {config.feature_map} {site.location}")


def _prepare(sample: dict[str, Any]) -> dict[str, Any]:
    q, k, v = (sample[n].detach().float() for n in ("q", "k", "v"))
    kw = key_weights(sample.get("mask"), q.shape[1], k.shape[1], k.shape[2])
    return {"q": q, "k": k, "v": v, "kw": kw, "causal": bool(sample.get("causal", False)),
            "out": sample["out"].detach().float()}


# -- ONNX lowering (targets "onnx" and "onnxruntime": standard opset-23 ops) ---------------------


def _static(value: Any, axis: int, what: str) -> int:
    return static(value, axis, what, who="linear attention", hint="export with static head sizes")


def _onnx_project(x, name: str, scale: float, w, b):
    if name in fm.SCALED_MAPS:
        x = op.Mul(x, op.Constant(value_float=math.sqrt(scale)))
    if w is not None:
        x = op.MatMul(x, w)                                  # [B, H, L, D] @ [H, D, m]
        if b is not None:
            x = op.Add(x, op.Unsqueeze(b, _ints(1)))         # + [H, 1, m]
    return x


def _onnx_map(x, name: str, in_dim: int):
    if name == "elu":
        return op.Add(op.Elu(x), op.Constant(value_float=1.0))
    if name == "relu":
        return op.Relu(x)
    if name == "taylor":
        # Upper triangle row by row (x_r · x[r:]), as in torch: Slice + Mul, no Gather (ORT's
        # CPU Gather along the last axis is ~50x slower here).
        _, _, coef = fm.taylor_pairs(in_dim)
        rows = [op.Mul(op.Slice(x, _ints(r), _ints(r + 1), _ints(-1)),
                       op.Slice(x, _ints(r), _ints(in_dim), _ints(-1))) for r in range(in_dim)]
        quad = op.Mul(op.Concat(*rows, axis=-1), _const(coef.numpy().astype(np.float32)))
        ones = op.ConstantOfShape(op.Concat(op.Shape(x, end=-1), _ints(1), axis=0),
                                  value=ir.tensor(np.array([1.0], dtype=np.float32)))
        return op.Concat(ones, x, quad, axis=-1)
    if name == "learned":
        return op.Concat(op.Softmax(x, axis=-1), op.Softmax(op.Neg(x), axis=-1), axis=-1)
    raise ExportError(f"no ONNX lowering for feature map {name!r}")


def _onnx_performer_logits(x, omega):
    sq = op.ReduceSum(op.Mul(x, x), _ints(-1), keepdims=1)
    return op.Sub(op.MatMul(x, omega), op.Mul(sq, op.Constant(value_float=0.5)))


def _onnx_key_weights(mask, kv_len_source):
    """``[B', Hm, Lk, 1]`` float key weights from a key-padding mask (see :func:`key_weights`)."""
    rank = len(mask.shape)
    if rank < 4:
        mask = op.Unsqueeze(mask, _ints(*range(4 - rank)))
    if mask.dtype == ir.DataType.BOOL:
        w = op.Cast(mask, to=ir.DataType.FLOAT)
    else:
        m = op.Cast(mask, to=ir.DataType.FLOAT)
        top = op.Max(op.ReduceMax(m, _ints(-1), keepdims=1), op.Constant(value_float=HARD_FILL))
        w = op.Exp(op.Sub(m, top))
    # A mask that broadcasts along the keys ([.., 1]) is expanded to Lk first.
    lk = op.Shape(kv_len_source, start=2, end=3)
    w = op.Expand(w, op.Concat(op.Shape(w, end=3), lk, axis=0))
    return op.Transpose(w, perm=[0, 1, 3, 2])


def _onnx_features(q, k, attn_mask, wq, bq, wk, bk, omega, scale: float, name: str, d: int):
    in_dim = d if wq is None else _static(wq, 2, "projection size")
    xq = _onnx_project(q, name, scale, wq, bq)
    xk = _onnx_project(k, name, scale, wk, bk)
    kw = None if attn_mask is None else _onnx_key_weights(attn_mask, k)
    if name == "performer":
        lq = _onnx_performer_logits(xq, omega)
        fq = op.Exp(op.Sub(lq, op.ReduceMax(lq, _ints(-1), keepdims=1)))
        lk = _onnx_performer_logits(xk, omega)
        masked = lk if kw is None else op.Where(
            op.Greater(kw, op.Constant(value_float=0.0)), lk,
            op.Constant(value_float=float("-inf")))
        shift = op.Max(op.ReduceMax(masked, _ints(2, 3), keepdims=1),
                       op.Constant(value_float=-1e30))
        fk = op.Exp(op.Sub(lk, shift))
    else:
        fq = _onnx_map(xq, name, in_dim)
        fk = _onnx_map(xk, name, in_dim)
    if kw is not None:
        fk = op.Mul(fk, kw)
    return fq, fk


@onnx_translation(torch.ops.attnopt.linear_attention.default, "onnx", "onnxruntime")
def linear_attention_onnx(q, k, v, attn_mask=None, wq=None, bq=None, wk=None, bk=None,
                          omega=None, is_causal: bool = False, scale: float = 1.0,
                          feature_map: str = "elu", block: int = 64):
    """ONNX lowering of :func:`linear_attention` (standard ops; any sequence length).

    Non-causal: ``MatMul(φ(Q), MatMul(φ(K)ᵀ, [V, 1]))``. Causal: ``Pad`` to a multiple of
    ``block``, ``Reshape`` into blocks, masked intra-block ``MatMul``, inter-block state from an
    exclusive ``CumSum`` over the block states, ``Slice`` back. ``com.microsoft`` has no fitting
    contrib op (its ``LinearAttention`` has no feature map nor normaliser), so the ONNX Runtime
    target uses the same decomposition. Heads folded into the batch (``[1, B·H, L, D]``, no
    per-head projections) run as ``B·H`` one-head sequences.
    """
    if wq is None and wk is None and ox.folded_heads(q, k, v, attn_mask):
        return ox.as_one_head_sequences(
            linear_attention_onnx, q, k, v, attn_mask, omega=omega, is_causal=is_causal,
            scale=scale, feature_map=feature_map, block=block)
    h, d = _static(q, 1, "head count"), _static(q, 3, "head dim")
    hkv, dv = _static(k, 1, "kv head count"), _static(v, 3, "value dim")
    g, e = h // hkv, dv + 1
    out_type = q.dtype
    qf, kf, vf = (op.Cast(x, to=ir.DataType.FLOAT) for x in (q, k, v))
    fq, fk = _onnx_features(qf, kf, attn_mask, wq, bq, wk, bk, omega, scale, feature_map, d)
    in_dim = d if wq is None else _static(wq, 2, "projection size")
    fdim = fm.feature_dim(feature_map, in_dim,
                          None if omega is None else _static(omega, 1, "random features"))
    ones = op.ConstantOfShape(op.Concat(op.Shape(vf, end=3), _ints(1), axis=0),
                              value=ir.tensor(np.array([1.0], dtype=np.float32)))
    v1 = op.Concat(vf, ones, axis=-1)                        # [B, Hkv, Lk, Dv+1]
    if is_causal:
        o = _onnx_causal(fq, fk, v1, h, hkv, g, block, fdim, e)
    else:
        kv = op.MatMul(op.Transpose(fk, perm=[0, 1, 3, 2]), v1)             # [B, Hkv, F, E]
        o = op.MatMul(op.Reshape(fq, _ints(0, hkv, -1, fdim)), kv)          # [B, Hkv, G·Lq, E]
        o = op.Reshape(o, _ints(0, h, -1, e))
    num = op.Slice(o, _ints(0), _ints(dv), _ints(3))
    den = op.Slice(o, _ints(dv), _ints(e), _ints(3))
    out = op.Div(num, op.Max(den, op.Constant(value_float=TINY)))
    return op.Cast(out, to=out_type)


def _onnx_causal(fq, fk, v1, h: int, hkv: int, g: int, c: int, fdim: int, e: int):
    n = op.Shape(fq, start=2, end=3)
    blk = _ints(c)
    pad = op.Mod(op.Sub(blk, op.Mod(n, blk)), blk)
    pads = op.Concat(_ints(0, 0, 0, 0, 0, 0), pad, _ints(0), axis=0)
    fq, fk, v1 = (op.Pad(x, pads) for x in (fq, fk, v1))
    fq = op.Reshape(fq, _ints(0, hkv, g, -1, c, fdim))
    fq = op.Reshape(op.Transpose(fq, perm=[0, 1, 3, 2, 4, 5]), _ints(0, hkv, -1, g * c, fdim))
    fk = op.Reshape(fk, _ints(0, hkv, -1, c, fdim))                         # [B, Hkv, nb, C, F]
    v1 = op.Reshape(v1, _ints(0, hkv, -1, c, e))
    fk_t = op.Transpose(fk, perm=[0, 1, 2, 4, 3])
    tri = _intra_mask(c, g, torch.device("cpu")).numpy()
    scores = op.Mul(op.MatMul(fq, fk_t), _const(tri))                      # [B, Hkv, nb, G·C, C]
    o = op.MatMul(scores, v1)
    kv = op.MatMul(fk_t, v1)                                                # [B, Hkv, nb, F, E]
    prefix = op.CumSum(kv, op.Constant(value_int=2), exclusive=1)
    o = op.Add(o, op.MatMul(fq, prefix))
    o = op.Reshape(o, _ints(0, hkv, -1, g, c, e))
    o = op.Reshape(op.Transpose(o, perm=[0, 1, 3, 2, 4, 5]), _ints(0, h, -1, e))
    return op.Slice(o, _ints(0), n, _ints(2))
