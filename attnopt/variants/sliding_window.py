"""Sliding-window attention: canonical site → ``torch.ops.attnopt.sliding_window`` (O(N·window)).

Each query attends only to the keys near it:
  * bidirectional: key j is visible to query i iff ``|i - j| <= window`` (2·window + 1 keys);
  * causal: iff ``0 <= i - j < window`` — the last ``window`` keys *including* the query itself
    (the convention of Mistral's ``sliding_window``, ORT ``GroupQueryAttention.local_window_size``
    and the matcher's ``causal window=W``).
``causal=None`` (the default) follows the site: causal sites (``is_causal``, or a causal window
already in their mask) get the causal window, bidirectional ones the symmetric window. An explicit
``causal=True`` / ``False`` applies only to sites of that kind and leaves the others exact with a
reason (a bidirectional window on a causal model would let queries see future tokens; a causal
window on an encoder would change what it computes): use it with per-site overrides.

Constraints:
  * self attention, or cross attention with ``Lq == Lk`` (query i and key i are aligned
    positions); cross attention with different lengths is refused;
  * masks: any mask the site has (padding, the model's own window, biases) is applied inside
    the window, so the result is the exact attention restricted to the window;
  * GQA: the query heads of a kv group share their key band (k / v are never repeated).

Fast path: query blocks of ``b`` rows read the key band ``[s - lo, s + b + hi)`` as a strided
view of k (see ``_sparse.BandPlan``); time O(N·(window + b)), no N×N tensor.

ONNX: causal windows without a mask lower to ``com.microsoft.GroupQueryAttention`` with
``local_window_size`` for target ``onnxruntime`` when the sequence is short enough for its CPU
kernel (which allocates the full ``S×S`` probabilities); everything else is a block-wise
decomposition in standard opset-23 ops (``_sparse.onnx_band_attention``) whose largest tensor is
``[B, H, N/b, b, b + reach]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnopt.errors import ConfigError
from attnopt.export._registry import onnx_translation
from attnopt.variants import _flex, _sparse
from attnopt.variants._base import SiteOperands, Variant, register

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite


@dataclass(frozen=True, kw_only=True)
class SlidingWindow(Variant):
    """Local attention within a window of keys around (or before) each query.

    Attributes:
        window: bidirectional: keys with ``|i - j| <= window``; causal: the last ``window`` keys,
            the query's own included.
        causal: None follows the site; True / False applies only to causal / bidirectional
            sites (the others are left exact with a reason).
    """

    name = "sliding_window"
    exact = False

    window: int
    causal: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(f"window must be a positive int (e.g. 512), got {self.window!r}")
        if self.causal not in (None, True, False):
            raise ConfigError(f"causal must be None (follow the site), True or False, "
                              f"got {self.causal!r}")


def band_reach(window: int, causal: bool) -> tuple[int, int]:
    """``(lo, hi)``: keys before and after the query that a window lets in."""
    return (window - 1, 0) if causal else (window, window)


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::sliding_window", mutates_args=())
def sliding_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    window: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Sliding-window attention on canonical operands.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``; applied inside the window.
        window: see :class:`SlidingWindow`.
        causal: causal window (the last ``window`` keys) instead of ``|i - j| <= window``.
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous; rows whose window is fully masked are 0.
    """
    if q.is_cuda and (out := _flex.dispatch("sliding_window", q, k, v, attn_mask, window, causal,
                                             scale)) is not None:
        return out
    mask = _sparse.check_operands(q, k, v, attn_mask)
    lo, hi = band_reach(window, causal)
    runner = _sparse.BlockedRunner(q, k, v, mask, scale)
    return runner.run(_sparse.BandPlan(runner, lo=lo, hi=hi)).to(q.dtype)


@sliding_window.register_fake
def _(q, k, v, attn_mask, window, causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def window_pattern(lq: int, lk: int, window: int, causal: bool,
                   device: torch.device | None = None) -> torch.Tensor:
    """The ``[Lq, Lk]`` bool pattern of a window (True = computed)."""
    lo, hi = band_reach(window, causal)
    d = torch.arange(lq, device=device)[:, None] - torch.arange(lk, device=device)[None, :]
    return (d <= lo) & (d >= -hi)


def reference_sliding_window(q, k, v, attn_mask=None, window: int = 1, causal: bool = False,
                             scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`sliding_window`: dense attention under the window pattern."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = window_pattern(q.shape[-2], k.shape[-2], window, causal, q.device)
    return _sparse.reference_sparse(q, k, v, attn_mask, allowed, scale)


# -- the implementation ----------------------------------------------------------------------------


def resolve_causal(config: SlidingWindow, site: AttentionSite) -> tuple[bool, str | None]:
    """The causality the window takes at ``site``, or the reason it cannot apply."""
    site_causal = _sparse.site_is_causal(site)
    if config.causal is None or config.causal == site_causal:
        return site_causal, None
    if config.causal:
        return True, ("causal=True applies only to causal sites; this site is bidirectional "
                      f"(mask: {site.mask}); use causal=None or False")
    return False, ("causal=False (a bidirectional window) would let this causal site see "
                   "future keys; use causal=None or True")


@register(SlidingWindow)
class SlidingWindowImpl:
    """Emits ``torch.ops.attnopt.sliding_window``."""

    def can_apply(self, config: SlidingWindow, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if site.kind == "cross" and site.q_len != site.kv_len:
            return (f"cross attention with Lq={site.q_len} != Lk={site.kv_len}: query and key "
                    "positions are not aligned, a window over them has no meaning")
        return resolve_causal(config, site)[1]

    def emit(self, config: SlidingWindow, graph: Graph, ops: SiteOperands,
             site: AttentionSite) -> Node:
        causal = resolve_causal(config, site)[0]
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.sliding_window.default,
            (ops.q, ops.k, ops.v, ops.mask, config.window, causal, scale),
        )

    def density(self, config: SlidingWindow, site: AttentionSite) -> float:
        """Pairs in the window over the pairs exact attention computes (causal: the triangle)."""
        lq, lk = site.q_len, site.kv_len
        if not (isinstance(lq, int) and isinstance(lk, int) and lq and lk):
            return 1.0
        causal = resolve_causal(config, site)[0]
        lo, hi = band_reach(config.window, causal)
        exact = _sparse.exact_pairs(lq, lk, _sparse.site_is_causal(site))
        return min(1.0, _sparse.band_pairs(lq, lk, lo, hi) / exact)


# -- ONNX ------------------------------------------------------------------------------------------


@onnx_translation(torch.ops.attnopt.sliding_window.default, "onnx")
def sliding_window_onnx(q, k, v, attn_mask=None, window: int = 1, causal: bool = False,
                        scale: float = 1.0):
    """Standard ops: block-wise band decomposition (no N×N tensor)."""
    lo, hi = band_reach(window, causal)
    return _sparse.onnx_band_attention(q, k, v, attn_mask, lo=lo, hi=hi, sinks=0, scale=scale)


@onnx_translation(torch.ops.attnopt.sliding_window.default, "onnxruntime")
def sliding_window_ort(q, k, v, attn_mask=None, window: int = 1, causal: bool = False,
                       scale: float = 1.0):
    """ORT: ``GroupQueryAttention(local_window_size=window)`` for short unmasked causal windows."""
    if causal and attn_mask is None and _sparse.gqa_fits(q, k, v):
        return _sparse.onnx_gqa_local(q, k, v, window=window, scale=scale)
    return sliding_window_onnx(q, k, v, attn_mask, window, causal, scale)
