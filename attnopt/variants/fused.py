"""Fused (exact) attention: canonical site → one ``torch.ops.attnopt.attention`` call.

The op is the exact canonical form every matched spelling becomes. Its torch implementation is
one ``scaled_dot_product_attention`` call (flash / memory-efficient kernels; no N×N scores).
Compared with emitting ``aten.scaled_dot_product_attention`` directly, the op also carries
  * a causal flag *together with* a padding mask (SDPA accepts only one of them): when the
    padding mask lets every key through at run time, the causal kernel runs alone;
  * GQA with fewer kv heads (``enable_gqa``), so no repeated k/v is materialised (except on
    CUDA where flash cannot run — a mask, fp32 — as the other kernels take no GQA there);
  * a mask that lets every key through is dropped, so padding-free sites reach the mask-free
    kernels (on CUDA: flash / cuDNN for fp16 / bf16; ``_backends`` reports which one runs);
and it is one node per site in an exported program, so each export target lowers it directly
(ONNX ``Attention``, ``com.microsoft.MultiHeadAttention`` / ``GroupQueryAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnopt.variants import softcap as _softcap  # noqa: F401 - registers the capped op
from attnopt.variants._base import SiteOperands, Variant, register

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from attnopt.sites import AttentionSite


@dataclass(frozen=True, kw_only=True)
class Fused(Variant):
    """Exact fused attention (the default): one SDPA call per site."""

    name = "fused"
    exact = True

    def describe(self) -> str:
        """Report label."""
        return "fused"


@torch.library.custom_op("attnopt::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Exact attention ``softmax(scale * q kᵀ + mask) v`` on canonical operands.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0`` (GQA / MQA when ``Hkv < H``).
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``.
        is_causal: key j is visible to query i only when ``j <= i`` (top-left aligned).
        scale: multiplier of the scores.

    Returns:
        ``[B, H, Lq, Dv]``, contiguous.
    """
    if is_causal and attn_mask is not None:
        attn_mask = _with_causal(attn_mask, q.shape[-2], k.shape[-2])
        is_causal = attn_mask is None
    elif attn_mask is not None and _lets_all_through(attn_mask):
        attn_mask = None  # a padding mask with no padding: the mask-free (flash) kernels run
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.is_cuda and not _flash_takes(q, attn_mask):
        # Only CUDA's flash kernel takes GQA (torch <= 2.12): where flash cannot run (a mask,
        # fp32, head dim > 256), SDPA would fall back to its math kernel and build the N×N
        # scores; with k / v repeated the memory-efficient kernel runs instead.
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        gqa = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa,
    )
    return out.contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _flash_takes(q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether CUDA's flash kernel can run this site (no mask, fp16 / bf16, head dim <= 256)."""
    return attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _lets_all_through(mask: torch.Tensor) -> bool:
    """Whether a mask changes nothing (bool: all True; additive: all 0)."""
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def _with_causal(mask: torch.Tensor, lq: int, lk: int) -> torch.Tensor | None:
    """Combine a mask with the causal pattern; None when the mask lets every key through."""
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return None
        causal = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
        return mask & causal
    if not bool(mask.any()):
        return None
    causal = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    return mask.masked_fill(~causal, float("-inf"))


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Slow reference of :func:`attention`: explicit scores, mask, softmax (tests use it)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask.float()
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(),
                          float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


@register(Fused)
class FusedImpl:
    """Emits ``torch.ops.attnopt.attention`` for any fusable site."""

    def can_apply(self, config: Fused, site: AttentionSite) -> str | None:
        return None if site.fusable else site.reason

    def emit(self, config: Fused, graph: Graph, ops: SiteOperands, site: AttentionSite) -> Node:
        if site.softcap is not None:  # logits capped between the scores and the softmax
            return graph.call_function(
                torch.ops.attnopt.softcap_attention.default,
                (ops.q, ops.k, ops.v, ops.mask, ops.causal, float(ops.scale), float(site.softcap)),
            )
        return graph.call_function(
            torch.ops.attnopt.attention.default,
            (ops.q, ops.k, ops.v, ops.mask, ops.causal, float(ops.scale)),
        )

    def density(self, config: Fused, site: AttentionSite) -> float:
        return 1.0


# -- ONNX lowerings --------------------------------------------------------------------------------

from attnopt.export._registry import msft, onnx_translation  # noqa: E402


@onnx_translation(torch.ops.attnopt.attention.default, "onnx")
def attention_onnx(q, k, v, attn_mask, is_causal: bool, scale: float):
    """Standard ONNX ``Attention`` (opset 23): 4-D BNSH, GQA from the shapes, mask + causal."""
    from onnxscript import opset23 as op

    from attnopt.export._onnx_ops import expand_query_dim, is_bool, needs_query_expand, to_rank4

    if attn_mask is not None:
        expand = needs_query_expand(attn_mask)  # read before Max hides the mask's static shape
        attn_mask = to_rank4(attn_mask)
        if not is_bool(attn_mask):
            # ORT's Attention returns 0 for a row whose every score is at the float32 minimum
            # (HF's finfo.min fill plus a bias: DeBERTa's padded queries); SDPA averages the
            # values. Raised to -1e30 the row stays fully masked and both average; rows with a
            # visible key are unchanged (exp(-1e30 - max) = 0).
            attn_mask = op.Max(attn_mask, op.CastLike(op.Constant(value_float=-1e30), attn_mask))
        if expand:
            attn_mask = expand_query_dim(attn_mask, q)
    return op.Attention(q, k, v, attn_mask, is_causal=int(is_causal), scale=float(scale))[0]


@onnx_translation(torch.ops.attnopt.attention.default, "onnxruntime")
def attention_ort(q, k, v, attn_mask, is_causal: bool, scale: float):
    """ONNX Runtime contrib ops: ``GroupQueryAttention`` for causal unmasked GQA, otherwise
    ``MultiHeadAttention`` (kv heads repeated for GQA with a mask). ORT's CPU kernel takes its
    flash-style path only without a mask or causal flag; with either it computes the scores of
    one head at a time. A causal site with a mask gets the causal pattern folded into its bias.

    Heads folded into the batch (3-D attention code: q is ``[1, B·H, L, D]``, ``B·H`` dynamic)
    run as ``B·H`` single-head sequences. Otherwise, when the head counts are not static, it
    falls back to the standard ``Attention`` op.
    """
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    heads, kv_heads, dv = ox.static_dim(q, 1), ox.static_dim(k, 1), ox.static_dim(v, 3)
    if dv is not None and (heads is None or kv_heads is None) and ox.heads_in_batch(
            q, k, v, attn_mask):
        return _one_head_sequences(q, k, v, attn_mask, is_causal, scale)
    if heads is None or kv_heads is None or dv is None:
        return attention_onnx(q, k, v, attn_mask, is_causal, scale)
    if kv_heads != heads and is_causal and attn_mask is None:
        lq = op.Shape(q, start=2, end=3)
        total = op.Cast(op.Squeeze(lq), to=6)  # int32 scalar
        seqlens = op.Cast(op.Expand(op.Sub(lq, op.Constant(value_ints=[1])),
                                    op.Shape(q, start=0, end=1)), to=6)
        out = msft().GroupQueryAttention(
            ox.bnsh_to_bsd(q), ox.bnsh_to_bsd(k), ox.bnsh_to_bsd(v), None, None, seqlens, total,
            num_heads=heads, kv_num_heads=kv_heads, scale=float(scale),
        )[0]
        return ox.bsd_to_bnsh(out, heads)
    if kv_heads != heads:
        k = ox.repeat_heads(k, heads // kv_heads)
        v = ox.repeat_heads(v, heads // kv_heads)
    bias, expand = _bias(attn_mask, q)
    return _multi_head_attention(q, k, v, bias, expand, is_causal, scale, heads)


def _bias(attn_mask, q):
    """``(additive 4-D bias or None, whether its query dim must be broadcast to Lq)``."""
    from attnopt.export import _onnx_ops as ox

    if attn_mask is None:
        return None, False
    expand = ox.needs_query_expand(attn_mask)
    return ox.to_rank4(ox.additive(attn_mask, q), ox.rank(attn_mask)), expand


def _one_head_sequences(q, k, v, attn_mask, is_causal: bool, scale: float):
    """Attention on ``[1, B·H, L, D]`` operands as ``B·H`` sequences of one head each."""
    from onnxscript import opset23 as op

    def swap(x):  # [1, B·H, ...] <-> [B·H, 1, ...]
        return op.Transpose(x, perm=[1, 0, 2, 3])

    bias, expand = _bias(attn_mask, q)
    out = _multi_head_attention(swap(q), swap(k), swap(v), None if bias is None else swap(bias),
                                expand, is_causal, scale, heads=1)
    return swap(out)


def _multi_head_attention(q, k, v, bias, expand: bool, is_causal: bool, scale: float,
                          heads: int):
    """``com.microsoft.MultiHeadAttention`` on BNSH operands with an additive 4-D ``bias``."""
    from attnopt.export import _onnx_ops as ox

    if bias is not None:
        if is_causal:
            # A mask and causal: the causal pattern goes into the bias. ORT's CPU kernel is
            # ~10 % slower with ``unidirectional=1`` plus a bias (it builds a causal mask of its
            # own, filled with -10000, and adds the bias to it), and -inf keeps rows whose every
            # visible key is masked the same as the torch op (its causal fill is -inf too).
            bias = _fold_causal(bias, q, k)
            is_causal = False
        elif expand:
            bias = ox.expand_query_dim(bias, q)
    out = msft().MultiHeadAttention(
        ox.bnsh_to_bsd(q), ox.bnsh_to_bsd(k), ox.bnsh_to_bsd(v), None, None, bias,
        num_heads=heads, scale=float(scale), unidirectional=int(is_causal),
    )
    if isinstance(out, (tuple, list)):
        out = out[0]
    return ox.bsd_to_bnsh(out, heads)


def _fold_causal(bias, q, k):
    """``bias`` (4-D, additive) with -inf where key j > query i (top-left aligned).

    The result broadcasts to ``[.., Lq, Lk]``: the causal pattern of :func:`attention` folded
    into the bias.
    """
    from onnxscript import opset23 as op

    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    lq = op.Squeeze(op.Shape(q, start=2, end=3))
    lk = op.Squeeze(op.Shape(k, start=2, end=3))
    rows = op.Unsqueeze(op.Range(zero, lq, one), op.Constant(value_ints=[1]))  # [Lq, 1]
    visible = op.LessOrEqual(op.Range(zero, lk, one), rows)  # [Lq, Lk]
    return op.Where(visible, bias, op.CastLike(op.Constant(value_float=float("-inf")), bias))
