"""Exact attention with soft-capped logits (Gemma-2, Grok): ``c * tanh(scores / c)``.

SDPA cannot apply a transform between the scores and the softmax, so a soft-capped site gets
its own op, ``torch.ops.attnopt.softcap_attention``: an online (running max / running sum)
softmax over blocks of keys that caps each ``[Lq, block]`` slice of scores as it goes, so the
``Lq × Lk`` scores never exist at once. It is the exact path of the ``Fused`` variant for sites
whose logits are capped (see ``attnopt.variants.fused``); the mask is added *after* the cap, as
the models write it (a cap applied after a ``-inf`` mask would let masked keys through).

On CUDA the op runs FlexAttention with the cap as a ``score_mod`` (``_flex.softcap_attention``:
causal sites skip the future tiles); the online-softmax loop stays the CPU path and the fallback.

ONNX lowerings: standard ``Attention`` (opset 23, ``softcap`` attribute; mask and causal bias
added after the cap by the spec) and ONNX Runtime's ``GroupQueryAttention`` (``softcap``
attribute) for causal sites; ORT's ``MultiHeadAttention`` has no cap, so non-causal sites use the
standard op on that target too. TensorRT's parser rejects the ``softcap`` attribute, so the
``"tensorrt"`` target writes the decomposed pattern with ``Div → Tanh → Mul`` on the scores.
"""

from __future__ import annotations

import torch

from attnopt.variants import _flex

# Keys per block of the online softmax: the scores held at once are [B, H, Lq, BLOCK].
BLOCK = 256


@torch.library.custom_op("attnopt::softcap_attention", mutates_args=())
def softcap_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """``softmax(softcap * tanh(scale * q kᵀ / softcap) + mask) v`` without the N×N scores.

    Args:
        q: ``[B, H, Lq, D]``.
        k: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0``.
        v: ``[B, Hkv, Lk, Dv]``.
        attn_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[B, H, Lq, Lk]``; added after the cap.
        is_causal: key j is visible to query i only when ``j <= i`` (top-left aligned).
        scale: multiplier of the scores (before the cap).
        softcap: the cap ``c > 0``.

    Returns:
        ``[B, H, Lq, Dv]`` in q's dtype; the running sums are kept in float32.
    """
    if q.is_cuda:
        out = _flex.dispatch("softcap_attention", q, k, v, attn_mask, is_causal, scale, softcap)
        if out is not None:
            return out.to(q.dtype)
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rep = h // hkv
    # GQA without repeating k/v: query heads grouped under their kv head.
    qg = q.float().reshape(b, hkv, rep, lq, q.shape[-1])
    kg, vg = k.float().unsqueeze(2), v.float().unsqueeze(2)
    mask = _grouped_mask(attn_mask, h, hkv, rep)
    rows = torch.arange(lq, device=q.device).unsqueeze(1)
    m = torch.full((b, hkv, rep, lq, 1), float("-inf"), device=q.device)
    s = torch.zeros_like(m)
    acc = torch.zeros((b, hkv, rep, lq, v.shape[-1]), device=q.device)
    for start in range(0, lk, BLOCK):
        if is_causal and start > lq - 1:
            break  # every later key is in the future of every query
        stop = min(start + BLOCK, lk)
        x = (qg @ kg[..., start:stop, :].transpose(-2, -1)) * scale
        x = torch.tanh(x / softcap) * softcap
        if mask is not None:
            mb = mask[..., start:stop]
            x = x.masked_fill(~mb, float("-inf")) if mb.dtype == torch.bool else x + mb.float()
        if is_causal:
            cols = torch.arange(start, stop, device=q.device).unsqueeze(0)
            x = x.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, x.amax(-1, keepdim=True))
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(x - shift)
        fix = torch.exp(m - shift)
        s = s * fix + p.sum(-1, keepdim=True)
        acc = acc * fix + p @ vg[..., start:stop, :]
        m = m_new
    out = acc / s
    return out.reshape(b, h, lq, v.shape[-1]).to(q.dtype)


@softcap_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _grouped_mask(mask: torch.Tensor | None, h: int, hkv: int, rep: int) -> torch.Tensor | None:
    """A mask broadcastable to ``[B, H, Lq, Lk]`` as one broadcastable to the grouped
    ``[B, Hkv, rep, Lq, Lk]`` scores.
    """
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.reshape(mask.shape[0], hkv, rep, mask.shape[2], mask.shape[3])


def reference_softcap_attention(q, k, v, attn_mask=None, is_causal=False, scale=None,
                                softcap=50.0):
    """Slow dense reference of :func:`softcap_attention` (tests compare the two)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask.float()
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


# -- ONNX lowerings --------------------------------------------------------------------------------

from attnopt.export._registry import msft, onnx_translation  # noqa: E402


@onnx_translation(torch.ops.attnopt.softcap_attention.default, "onnx")
def softcap_attention_onnx(q, k, v, attn_mask, is_causal: bool, scale: float, softcap: float):
    """Standard ONNX ``Attention`` (opset 23) with its ``softcap`` attribute."""
    from onnxscript import opset23 as op

    from attnopt.export._onnx_ops import expand_query_dim, needs_query_expand, to_rank4

    if attn_mask is not None:
        expand = needs_query_expand(attn_mask)
        attn_mask = to_rank4(attn_mask)
        if expand:
            attn_mask = expand_query_dim(attn_mask, q)
    return op.Attention(q, k, v, attn_mask, is_causal=int(is_causal), scale=float(scale),
                        softcap=float(softcap))[0]


@onnx_translation(torch.ops.attnopt.softcap_attention.default, "tensorrt")
def softcap_attention_tensorrt(q, k, v, attn_mask, is_causal: bool, scale: float,
                               softcap: float):
    """TensorRT (every version): the decomposed pattern with the cap between the MatMuls,
    ``MatMul(q·scale, kᵀ) → Div(c) → Tanh → Mul(c) → Add(mask) → Softmax → MatMul(·, v)``;
    IAttention has no cap.
    """
    from attnopt.tensorrt._lowerings import attention_decomposed

    return attention_decomposed(q, k, v, attn_mask, is_causal, scale, softcap=softcap)


@onnx_translation(torch.ops.attnopt.softcap_attention.default, "onnxruntime")
def softcap_attention_ort(q, k, v, attn_mask, is_causal: bool, scale: float, softcap: float):
    """ONNX Runtime: ``GroupQueryAttention`` (``softcap``; always causal) for causal sites with
    static head counts, a mask going in as its ``attention_bias``; otherwise the standard op.
    """
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    heads, kv_heads = ox.static_dim(q, 1), ox.static_dim(k, 1)
    if not is_causal or heads is None or kv_heads is None:
        return softcap_attention_onnx(q, k, v, attn_mask, is_causal, scale, softcap)
    bias = None
    if attn_mask is not None:
        bias = ox.to_rank4(ox.additive(attn_mask, q), ox.rank(attn_mask))
        if ox.needs_query_expand(attn_mask):
            bias = ox.expand_query_dim(bias, q)
    lq = op.Shape(q, start=2, end=3)
    total = op.Cast(op.Squeeze(lq), to=6)  # int32 scalar
    seqlens = op.Cast(op.Expand(op.Sub(lq, op.Constant(value_ints=[1])),
                                op.Shape(q, start=0, end=1)), to=6)
    out = msft().GroupQueryAttention(
        ox.bnsh_to_bsd(q), ox.bnsh_to_bsd(k), ox.bnsh_to_bsd(v), None, None, seqlens, total,
        None, None, None, bias,
        num_heads=heads, kv_num_heads=kv_heads, scale=float(scale), softcap=float(softcap),
    )[0]
    return ox.bsd_to_bnsh(out, heads)
