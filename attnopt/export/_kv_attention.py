"""Attention over a KV cache: one decoder site with its cache update → ``attnopt::kv_attention``.

    present_k = cat(past_k, k)      present_v = cat(past_v, v)
    out = softmax(scale · q present_kᵀ + causal/window/sinks/padding) present_v

The query at row ``i`` sits at cache index ``P + i`` (``P`` = past length, bottom-right
aligned causality); key ``j`` is visible when ``j <= P + i``, the window allows it — no window
(``window == 0``), ``P + i - j < window`` (the query's own key included, as HF
``sliding_window``) or ``j < sinks`` (attention sinks, ``attnopt.Streaming``) — and
``attention_mask[b, j] == 1``. Indices are *cache* indices: without eviction they are absolute
positions, so sinks + window is exactly the whole-sequence ``streaming_pattern``; a runner that
keeps the slots ``[0, sinks)`` and the last ``window - 1`` (``_generate``) computes the same
attention from a bounded cache. Masked scores get the dtype's minimum, not -inf, so a fully
masked row (a left-padding query) stays finite, as in HF's eager attention.

Operands: q ``[B, H, S, D]``, k / v ``[B, Hkv, S, D]`` (the new tokens), past_k / past_v
``[B, Hkv, P, D]``, attention_mask int ``[B, P + S]``.

ONNX lowerings:
  * ``onnxruntime``: ``com.microsoft.GroupQueryAttention`` with past/present, ``kv_num_heads``,
    ``local_window_size``; ``total_sequence_length = Shape(attention_mask)[1]`` and
    ``seqlens_k = total_sequence_length - 1`` for every row, the padding as ``attention_bias``.
    With sinks the whole sinks + window pattern goes into ``attention_bias`` and
    ``local_window_size = -1``: GQA has no sink tokens (its ``head_sink`` / ``smooth_softmax``
    add a logit to the softmax denominator, something else).
    The builder's ``ReduceSum(mask) - 1`` form is exact only for right padding: the CPU kernel
    then treats a left-padded prompt as if its tokens were at the front (measured: error 2.2 on
    a left-padded row). With past and present bound to one buffer (genai's
    ``past_present_share_buffer``) the kernel appends in place.
  * ``onnx``: the standard ``Attention`` (opset 23) with ``past_key`` / ``past_value`` inputs and
    ``present_*`` outputs, the causal/window/sinks/padding pattern as a float mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.export._registry import msft, onnx_translation

FLOAT32_MIN = float(torch.finfo(torch.float32).min)


@torch.library.custom_op("attnopt::kv_attention", mutates_args=())
def kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attention_mask: torch.Tensor,
    window: int,
    sinks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of new tokens over the cache plus themselves; see the module docstring.

    Args:
        q: ``[B, H, S, D]`` the new tokens' queries.
        k, v: ``[B, Hkv, S, D]`` the new tokens' keys / values (``H % Hkv == 0``).
        past_k, past_v: ``[B, Hkv, P, D]`` the cache.
        attention_mask: int ``[B, P + S]`` over the cache slots, 0 at padding.
        window: keys ``i - j < window`` are visible (the query's own included); 0: no window.
        sinks: keys ``j < sinks`` are visible whatever the window (0: none).
        scale: multiplier of the scores.

    Returns:
        ``(out [B, H, S, Dv], present_k [B, Hkv, P+S, D], present_v [B, Hkv, P+S, Dv])``.
    """
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    bias = kv_bias(attention_mask, q.shape[2], window, q.dtype, sinks)
    out = F.scaled_dot_product_attention(q, present_k, present_v, attn_mask=bias, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.contiguous(), present_k, present_v


@kv_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, window, sinks, scale):
    total = past_k.shape[2] + k.shape[2]
    return (q.new_empty((*q.shape[:-1], v.shape[-1])),
            k.new_empty((k.shape[0], k.shape[1], total, k.shape[3])),
            v.new_empty((v.shape[0], v.shape[1], total, v.shape[3])))


def visible(attention_mask: torch.Tensor, s: int, window: int, sinks: int = 0) -> torch.Tensor:
    """``[B, 1, S, T]`` bool: which keys each of the last ``S`` queries may attend to."""
    t = attention_mask.shape[1]
    i = torch.arange(s, device=attention_mask.device)[:, None] + (t - s)
    j = torch.arange(t, device=attention_mask.device)[None, :]
    allowed = j <= i
    if window > 0:
        allowed = allowed & ((i - j < window) | (j < sinks))
    return allowed[None, None] & attention_mask[:, None, None, :].bool()


def kv_bias(attention_mask: torch.Tensor, s: int, window: int, dtype: torch.dtype,
            sinks: int = 0) -> torch.Tensor:
    """Additive ``[B, 1, S, T]`` mask (0 visible, dtype minimum hidden) of :func:`visible`."""
    allowed = visible(attention_mask, s, window, sinks)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def reference_kv_attention(q, k, v, past_k, past_v, attention_mask, window: int, sinks: int,
                           scale: float):
    """Slow reference: explicit scores, mask, softmax, with k / v heads repeated."""
    pk, pv = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    rep = q.shape[1] // k.shape[1]
    kk, vv = pk.repeat_interleave(rep, 1).double(), pv.repeat_interleave(rep, 1).double()
    s = (q.double() @ kk.transpose(-2, -1)) * scale
    s = s.masked_fill(~visible(attention_mask, q.shape[2], window, sinks), FLOAT32_MIN)
    return (s.softmax(-1) @ vv).to(q.dtype), pk, pv


# -- ONNX ------------------------------------------------------------------------------------------


def _lengths(q, attention_mask):
    """``(B [1], S [1], T [1])`` int64 shape slices."""
    from onnxscript import opset23 as op

    return (op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=3),
            op.Shape(attention_mask, start=1, end=2))


def _padding_bias(q, attention_mask):
    """``[B, 1, S, T]`` additive bias: 0 where ``attention_mask`` is 1, float32 min where 0."""
    from onnxscript import opset23 as op

    b, s, t = _lengths(q, attention_mask)
    keep = op.Unsqueeze(op.Cast(attention_mask, to=9), op.Constant(value_ints=[1, 2]))
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    low = op.CastLike(op.Constant(value_float=FLOAT32_MIN), q)
    bias = op.Where(keep, zero, low)
    return op.Expand(bias, op.Concat(b, op.Constant(value_ints=[1]), s, t, axis=0))


def _pattern_bias(q, attention_mask, window: int, sinks: int):
    """``[B, 1, S, T]`` additive mask: causal, window, sinks and padding (see :func:`visible`)."""
    from onnxscript import opset23 as op

    _, s, t = _lengths(q, attention_mask)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    s0, t0 = op.Squeeze(s), op.Squeeze(t)
    rows = op.Unsqueeze(op.Add(op.Range(zero, s0, one), op.Sub(t0, s0)),
                        op.Constant(value_ints=[1]))  # [S, 1] cache indices of the queries
    cols = op.Range(zero, t0, one)  # [T]
    allowed = op.LessOrEqual(cols, rows)
    if window > 0:
        recent = op.Less(op.Sub(rows, cols), op.Constant(value_int=int(window)))
        if sinks > 0:
            recent = op.Or(recent, op.Less(cols, op.Constant(value_int=int(sinks))))
        allowed = op.And(allowed, recent)
    low = op.CastLike(op.Constant(value_float=FLOAT32_MIN), q)
    return op.Where(allowed, _padding_bias(q, attention_mask), low)


@onnx_translation(torch.ops.attnopt.kv_attention.default, "onnxruntime")
def kv_attention_ort(q, k, v, past_k, past_v, attention_mask, window: int, sinks: int,
                     scale: float):
    """``com.microsoft.GroupQueryAttention`` with past/present (see the module docstring)."""
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    heads, kv_heads = ox.static_dim(q, 1), ox.static_dim(k, 1)
    b, _, t = _lengths(q, attention_mask)
    total = op.Cast(op.Squeeze(t), to=6)
    seqlens = op.Cast(op.Expand(op.Sub(t, op.Constant(value_ints=[1])), b), to=6)
    with_sinks = window > 0 and sinks > 0
    # GQA has no sink tokens: the whole pattern becomes the bias and the kernel's window is off
    bias = (_pattern_bias(q, attention_mask, window, sinks) if with_sinks
            else _padding_bias(q, attention_mask))
    local = int(window) if window > 0 and not with_sinks else -1
    out, present_k, present_v = msft().GroupQueryAttention(
        ox.bnsh_to_bsd(q), ox.bnsh_to_bsd(k), ox.bnsh_to_bsd(v), past_k, past_v, seqlens, total,
        None, None, None, bias,
        num_heads=heads, kv_num_heads=kv_heads, scale=float(scale),
        local_window_size=local, _outputs=3,
    )
    return ox.bsd_to_bnsh(out, heads), present_k, present_v


@onnx_translation(torch.ops.attnopt.kv_attention.default, "onnx")
def kv_attention_onnx(q, k, v, past_k, past_v, attention_mask, window: int, sinks: int,
                      scale: float):
    """Standard ``Attention`` (opset 23) with ``past_key`` / ``past_value``, float mask."""
    from onnxscript import opset23 as op

    mask = _pattern_bias(q, attention_mask, window, sinks)
    outs = op.Attention(q, k, v, mask, past_k, past_v, scale=float(scale))
    return outs[0], outs[1], outs[2]
