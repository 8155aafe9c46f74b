"""TensorRT lowerings of the exact attention op: ``attnopt.attention`` → standard ONNX.

Two forms, chosen by the TensorRT version the file is for:
  * TensorRT >= 10.14: one opset-23 ``Attention`` node with one output (the parser maps it to
    ``IAttention``): 4-D BNSH operands, GQA from the shapes, no ``qk_matmul_output_mode`` /
    ``softcap``, an additive mask in q's dtype (a strongly typed network keeps it); a causal
    site that also has a mask gets the causal pattern folded into the mask (``IAttention``
    takes a mask or a causal flag, not both);
  * older TensorRT: the pattern TensorRT's attention fusion (Myelin) matches:
    ``MatMul(q·scale, kᵀ) → Add(mask) → Softmax → MatMul(·, v)``, the scale folded into Q
    before the first MatMul, K / V heads repeated for GQA.
Soft-capped sites (``attnopt.softcap_attention``) take the decomposed form on every version, the
cap (``Div → Tanh → Mul``) between the first MatMul and the mask: IAttention has no cap.
Attention on 3-D code (heads folded into the batch: q ``[1, B·H, L, D]``, ``B·H`` dynamic) runs
as ``B·H`` sequences of one head, so the head count TensorRT sees is static.

The sparse and linear variants' ``"onnx"`` lowerings already use standard ops only (block-wise
decompositions, no ``com.microsoft``); the ``"tensorrt"`` table reuses them, and every file is
checked against the operator matrix before it is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Half of float16's lowest finite value (-65504): see ``_floor``.
_FP16_FLOOR = -32752.0


def attention_op(q, k, v, attn_mask, is_causal: bool, scale: float):
    """One ``Attention`` node (opset 23), one output."""
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    if _heads_in_batch(q, k, v, attn_mask):
        return _per_sequence(attention_op, q, k, v, attn_mask, is_causal, scale)
    if attn_mask is not None:
        expand = ox.needs_query_expand(attn_mask)
        attn_mask = ox.to_rank4(attn_mask)
        if not ox.is_bool(attn_mask):  # an additive mask in q's dtype, as the torch op casts it
            attn_mask = _floor(op.CastLike(attn_mask, q), q)
        if is_causal:
            attn_mask = _fold_causal(attn_mask, q, k)
            is_causal = False
        elif expand:
            attn_mask = ox.expand_query_dim(attn_mask, q)
    return op.Attention(q, k, v, attn_mask, is_causal=int(is_causal), scale=float(scale))[0]


def attention_decomposed(q, k, v, attn_mask, is_causal: bool, scale: float,
                         softcap: float = 0.0):
    """``MatMul(q·scale, kᵀ) → Add(mask) → Softmax → MatMul(·, v)`` (Myelin's MHA pattern).

    ``softcap`` > 0 caps the logits before the mask, ``c·tanh(s / c)`` as
    ``Div(c) → Tanh → Mul(c)`` after the first MatMul: IAttention has no cap (the parser
    rejects ``Attention``'s ``softcap`` attribute), so capped sites take this form on every
    TensorRT version.
    """
    from onnxscript import opset23 as op

    from attnopt.errors import ExportError
    from attnopt.export import _onnx_ops as ox

    if _heads_in_batch(q, k, v, attn_mask):
        return _per_sequence(attention_decomposed, q, k, v, attn_mask, is_causal, scale,
                             softcap=softcap)
    heads, kv_heads = ox.static_dim(q, 1), ox.static_dim(k, 1)
    if heads is None or kv_heads is None:
        raise ExportError("the decomposed TensorRT attention needs static head counts; got q "
                          f"{q.shape} and k {k.shape}: export with static shapes")
    if kv_heads != heads:
        k = ox.repeat_heads(k, heads // kv_heads)
        v = ox.repeat_heads(v, heads // kv_heads)
    qs = op.Mul(q, op.CastLike(op.Constant(value_float=float(scale)), q))
    scores = op.MatMul(qs, op.Transpose(k, perm=[0, 1, 3, 2]))
    if softcap:
        cap = op.CastLike(op.Constant(value_float=float(softcap)), scores)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    bias = None
    if attn_mask is not None:
        bias = ox.additive(attn_mask, scores)
        if not ox.is_bool(attn_mask):
            bias = _floor(bias, q)
        bias = ox.to_rank4(bias, ox.rank(attn_mask))
    if is_causal:
        if bias is None:
            bias = op.CastLike(op.Constant(value_float=0.0), scores)
        bias = _fold_causal(bias, q, k)
    if bias is not None:
        scores = op.Add(scores, bias)
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def table(version: str) -> dict[object, Callable]:
    """The translation table of the tensorrt target for TensorRT ``version``."""
    from attnopt.export._registry import translation_table, translations_on_exact
    from attnopt.tensorrt._matrix import has_attention_op

    exact = attention_op if has_attention_op(version) else attention_decomposed
    out = dict(translation_table("onnx"))
    out.update(translation_table("tensorrt"))
    # ops that run exact attention inside (group_kv, streaming_heads, prune_heads) get this
    # version's form of it: their "onnx" lowerings write opset-23 Attention, which a pre-10.14
    # file cannot hold (the opset conversion has no older Attention to convert it to)
    out.update(translations_on_exact(exact))
    out[torch.ops.attnopt.attention.default] = exact
    return out


def _floor(mask, q):
    """An additive float ``mask`` (in q's dtype) raised to a finite floor: ``Max(mask, floor)``.

    HF models fill hidden positions with ``finfo.min`` (DeBERTa-v2 adds a position bias on top),
    so a padded query's row can have every score at the dtype's lowest value. SDPA averages
    such a row; ONNX Runtime's ``Attention`` returns 0 for it, and in fp16 ``finfo.min`` plus a
    negative score overflows to ``-inf`` (a row of ``-inf`` is NaN after Softmax). Raised to the
    floor, the row stays fully masked and finite, and every runtime averages it; rows with a
    visible key are unchanged, as ``exp(floor - max)`` is 0. The floor is ``-1e30`` (the "onnx"
    target's, ``attnopt.variants.fused.attention_onnx``) where the dtype holds it (fp32, bf16);
    fp16 cannot (``-1e30`` casts to ``-inf``), so there it is half the lowest finite fp16
    value, ``-32752``: exactly representable, with headroom for scores up to ``32752`` in
    magnitude before the sum overflows. A dtype not known while lowering gets the fp16 floor,
    which is finite in every float dtype.
    """
    from onnxscript import ir
    from onnxscript import opset23 as op

    low = -1e30 if q.dtype in (ir.DataType.FLOAT, ir.DataType.BFLOAT16) else _FP16_FLOOR
    return op.Max(mask, op.CastLike(op.Constant(value_float=low), mask))


def _fold_causal(mask, q, k):
    """``mask`` (rank 4, bool or additive) with key j > query i hidden (top-left aligned)."""
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    lq = op.Squeeze(op.Shape(q, start=2, end=3))
    lk = op.Squeeze(op.Shape(k, start=2, end=3))
    rows = op.Unsqueeze(op.Range(zero, lq, one), op.Constant(value_ints=[1]))  # [Lq, 1]
    visible = op.LessOrEqual(op.Range(zero, lk, one), rows)  # [Lq, Lk]
    if ox.is_bool(mask):
        return op.And(mask, visible)
    return op.Where(visible, mask, op.CastLike(op.Constant(value_float=float("-inf")), mask))


def _heads_in_batch(q, k, v, attn_mask) -> bool:
    from attnopt.export import _onnx_ops as ox

    return ox.static_dim(q, 1) is None and ox.heads_in_batch(q, k, v, attn_mask)


def _per_sequence(fn, q, k, v, attn_mask, is_causal: bool, scale: float, **kwargs):
    """``fn`` on ``[1, B·H, L, D]`` operands as ``B·H`` sequences of one head each."""
    from onnxscript import opset23 as op

    from attnopt.export import _onnx_ops as ox

    def swap(x):  # [1, B·H, ...] <-> [B·H, 1, ...]
        return op.Transpose(x, perm=[1, 0, 2, 3])

    if attn_mask is not None:
        attn_mask = swap(ox.to_rank4(attn_mask))
    return swap(fn(swap(q), swap(k), swap(v), attn_mask, is_causal, scale, **kwargs))
