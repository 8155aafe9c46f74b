"""Streaming attention: causal site → ``torch.ops.attnopt.streaming`` (attention sinks + window).

Each query attends to the first ``sinks`` keys of the sequence (the attention sinks) and to the
causal recent window — the last ``window`` keys including itself (StreamingLLM; DuoAttention's
streaming heads): key j is visible to query i iff ``j <= i`` and (``j < sinks`` or
``i - j < window``). Cost O(N·(sinks + window)) instead of O(N²).

Constraints:
  * causal self attention only: sinks and a recent window describe a left-to-right stream. A
    bidirectional site (an encoder) is refused with a reason — use ``SlidingWindow`` there;
    cross attention is refused;
  * masks: the site's masks (padding, the model's own window) are applied inside the pattern;
  * GQA: the query heads of a kv group share their sinks and band (k / v are never repeated).

Fast path: the sink keys are one extra segment of every query block (an expanded view, no copy)
and the band covers keys ``j >= sinks`` only (``_sparse.BandPlan``), so no key is counted twice.

ONNX: no ORT kernel expresses sinks + window (``GroupQueryAttention``'s ``head_sink`` is a
learned per-head logit, not sink tokens), so both targets use the block-wise decomposition of
``_sparse.onnx_band_attention`` with a sink segment.
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
class Streaming(Variant):
    """Attention sinks plus a causal recent window.

    Attributes:
        sinks: number of leading keys every query sees (e.g. 4).
        window: the last ``window`` keys (the query's own included) every query sees.
    """

    name = "streaming"
    exact = False

    sinks: int
    window: int

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ConfigError(f"sinks must be an int >= 0 (e.g. 4), got {self.sinks!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(f"window must be a positive int (e.g. 1024), got {self.window!r}")


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::streaming", mutates_args=())
def streaming(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    sinks: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Sink + recent-window causal attention on canonical operands.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``; applied inside the pattern.
        sinks: leading keys every query sees (when ``j <= i``).
        window: the last ``window`` keys, the query's own included.
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous; rows whose pattern is fully masked are 0.
    """
    if q.is_cuda and (out := _flex.dispatch("streaming", q, k, v, attn_mask, sinks, window,
                                             scale)) is not None:
        return out
    mask = _sparse.check_operands(q, k, v, attn_mask)
    runner = _sparse.BlockedRunner(q, k, v, mask, scale)
    plan = _sparse.BandPlan(runner, lo=window - 1, hi=0, sinks=sinks)
    return runner.run(plan).to(q.dtype)


@streaming.register_fake
def _(q, k, v, attn_mask, sinks, window, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def streaming_pattern(lq: int, lk: int, sinks: int, window: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """The ``[Lq, Lk]`` bool pattern (True = computed)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < window))


def reference_streaming(q, k, v, attn_mask=None, sinks: int = 4, window: int = 1,
                        scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`streaming`: dense attention under the sink + window pattern."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = streaming_pattern(q.shape[-2], k.shape[-2], sinks, window, q.device)
    return _sparse.reference_sparse(q, k, v, attn_mask, allowed, scale)


def streaming_pairs(lq: int, lk: int, sinks: int, window: int) -> int:
    """Pairs in the pattern (for densities)."""
    i = torch.arange(lq, dtype=torch.int64)
    visible = (i + 1).clamp(max=lk)
    sink = visible.clamp(max=sinks)
    recent = (visible - sink).clamp(min=0).clamp(max=window)
    return int((sink + recent).sum())


# -- the implementation ----------------------------------------------------------------------------


@register(Streaming)
class StreamingImpl:
    """Emits ``torch.ops.attnopt.streaming`` on causal self-attention sites."""

    def can_apply(self, config: Streaming, site: AttentionSite) -> str | None:
        reason = _sparse.common_refusal(site)
        if reason:
            return reason
        if site.kind != "self":
            return "streaming attention is for causal self attention; this is cross attention"
        if not _sparse.site_is_causal(site):
            return (f"streaming (sinks + recent window) is causal and this site is bidirectional "
                    f"(mask: {site.mask}); use SlidingWindow for encoders")
        return None

    def emit(self, config: Streaming, graph: Graph, ops: SiteOperands,
             site: AttentionSite) -> Node:
        scale = float(ops.scale) if ops.scale is not None else site.head_dim ** -0.5
        return graph.call_function(
            torch.ops.attnopt.streaming.default,
            (ops.q, ops.k, ops.v, ops.mask, config.sinks, config.window, scale),
        )

    def density(self, config: Streaming, site: AttentionSite) -> float:
        """Pairs in the pattern over the causal pairs of exact attention."""
        lq, lk = site.q_len, site.kv_len
        if not (isinstance(lq, int) and isinstance(lk, int) and lq and lk):
            return 1.0
        pairs = streaming_pairs(lq, lk, config.sinks, config.window)
        return min(1.0, pairs / _sparse.exact_pairs(lq, lk, True))


# -- ONNX ------------------------------------------------------------------------------------------


@onnx_translation(torch.ops.attnopt.streaming.default, "onnx", "onnxruntime")
def streaming_onnx(q, k, v, attn_mask=None, sinks: int = 4, window: int = 1,
                   scale: float = 1.0):
    """Block-wise decomposition: a sink segment plus the causal band (no N×N tensor)."""
    return _sparse.onnx_band_attention(q, k, v, attn_mask, lo=window - 1, hi=0, sinks=sinks,
                                       scale=scale)
