"""Causal linear attention on a recurrent state: decoder site → ``linear_state_attention``.

    state S = Σ_j φ(k_j) v_jᵀ ``[B, Hkv, F, Dv]``    normaliser z = Σ_j φ(k_j) ``[B, Hkv, F, 1]``
    out_i = φ(q_i)ᵀ (S_past + Σ_{j≤i} w_j φ(k_j) v_jᵀ)
            / max(φ(q_i)ᵀ (z_past + Σ_{j≤i} w_j φ(k_j)), tiny)

over the ``S`` new tokens of a chunk (prefill: the prompt, decode: one token), ``w_j`` being the
new tokens' ``attention_mask`` columns (0 at left padding: padded keys never enter the state).
This is the whole-sequence causal ``attnopt.Linear`` (``attnopt.variants.linear``) cut at the
chunk boundary: the same feature maps (``_feature_maps``: elu/relu on the unscaled q, k; taylor
on ``√scale·x``), the same key weights and the same normaliser clamp (``TINY``, no eps), so a
prefill followed by decode steps computes what ``Linear`` computes on the whole sequence (up to
float summation order). The state has no sequence axis: memory is constant in the length.

Constraints: feature maps without per-site fitted state (``elu``, ``relu``, ``taylor``);
``performer`` normalises keys by a maximum over *all* keys (not causal) and ``learned`` /
calibrated maps carry fitted projections, so decode export refuses them. Inside a chunk the
computation is the masked quadratic form (``[S, S]`` per head group): fine for decode and
prompts of a few thousand tokens.

Operands: q ``[B, H, S, D]``, k ``[B, Hkv, S, D]``, v ``[B, Hkv, S, Dv]`` (``H % Hkv == 0``;
query head ``h`` reads kv head ``h // (H / Hkv)``), past_s ``[B, Hkv, F, Dv]``,
past_z ``[B, Hkv, F, 1]``, attention_mask int ``[B, T]`` (``T`` = tokens so far; its last ``S``
columns are the new tokens').

ONNX lowering (targets ``onnx`` and ``onnxruntime``, standard opset-23 ops): features, one
``MatMul`` for the intra-chunk scores masked by a lower-triangular ``[S, S]`` built with
``Range``/``LessOrEqual``, ``MatMul`` with ``[V, 1]`` and with ``[S_past, z_past]`` for the
numerator and normaliser together, and ``state + φ(K)ᵀ [V, 1]`` for the presents.
"""

from __future__ import annotations

import numpy as np
import torch

from attnopt.export._onnx_ops import ints, ir, op, static
from attnopt.export._registry import onnx_translation
from attnopt.variants import _feature_maps as fm
from attnopt.variants._feature_maps import MapParams
from attnopt.variants.linear import TINY

#: feature maps a decoder state can carry: no fitted per-site state, causal key features.
STATE_MAPS = ("elu", "relu", "taylor")


def state_features(feature_map: str, head_dim: int) -> int:
    """F, the state's feature rows for ``feature_map`` on ``head_dim``-dimensional heads."""
    return fm.feature_dim(feature_map, head_dim)


@torch.library.custom_op("attnopt::linear_state_attention", mutates_args=())
def linear_state_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_s: torch.Tensor,
    past_z: torch.Tensor,
    attention_mask: torch.Tensor,
    scale: float,
    feature_map: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention of a chunk of new tokens on top of a state; see the module doc.

    Args:
        q: ``[B, H, S, D]`` the new tokens' queries.
        k, v: ``[B, Hkv, S, D]`` / ``[B, Hkv, S, Dv]`` the new tokens' keys / values.
        past_s: ``[B, Hkv, F, Dv]`` Σ φ(k_j) v_jᵀ over the valid earlier tokens (zeros at first).
        past_z: ``[B, Hkv, F, 1]`` Σ φ(k_j) over the same tokens.
        attention_mask: int ``[B, T]``, 0 at padding; its last ``S`` columns weight the keys.
        scale: the site's softmax scale (enters the scaled maps only, as in ``Linear``).
        feature_map: one of :data:`STATE_MAPS`.

    Returns:
        ``(out [B, H, S, Dv], present_s [B, Hkv, F, Dv], present_z [B, Hkv, F, 1])``.
    """
    b, h, s, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    p = MapParams(feature_map, scale)
    w = attention_mask[:, attention_mask.shape[1] - s:].float()[:, None, :, None]
    fq = fm.query_features(q, p)                                       # [B, H, S, F]
    fk = fm.key_features(k, p, w, None)                                # [B, Hkv, S, F]
    fdim = fq.shape[-1]
    fq = fq.reshape(b, hkv, (h // hkv) * s, fdim)                      # query heads by kv head
    v1 = torch.cat([v.float(), v.new_ones((b, hkv, s, 1), dtype=torch.float32)], -1)
    state = torch.cat([past_s.float(), past_z.float()], -1)            # [B, Hkv, F, Dv+1]
    tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).view(b, hkv, h // hkv, s, s) * tri
    o = scores.view(b, hkv, -1, s) @ v1 + fq @ state
    present = state + fk.transpose(-1, -2) @ v1
    out = (o[..., :dv] / o[..., dv:].clamp_min(TINY)).reshape(b, h, s, dv)
    return (out.to(q.dtype), present[..., :dv].to(past_s.dtype).contiguous(),
            present[..., dv:].to(past_z.dtype).contiguous())


@linear_state_attention.register_fake
def _(q, k, v, past_s, past_z, attention_mask, scale, feature_map):
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), past_s.new_empty(past_s.shape),
            past_z.new_empty(past_z.shape))


def empty_state(batch: int, kv_heads: int, features: int, value_dim: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The state before the first token: zeros ``[B, Hkv, F, Dv]`` and ``[B, Hkv, F, 1]``."""
    return (torch.zeros(batch, kv_heads, features, value_dim, dtype=dtype),
            torch.zeros(batch, kv_heads, features, 1, dtype=dtype))


def reference_linear_state(q, k, v, past_s, past_z, attention_mask, scale: float,
                           feature_map: str):
    """Slow reference: the recurrence token by token in fp64 (heads repeated, no grouping)."""
    s, g = q.shape[2], q.shape[1] // k.shape[1]
    p = MapParams(feature_map, scale)
    w = attention_mask[:, -s:].double()
    fq = fm.query_features(q.double(), p)
    fk = fm.key_features(k.double(), p, None, None).repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    st = past_s.double().repeat_interleave(g, 1)
    z = past_z.double().repeat_interleave(g, 1)[..., 0]
    outs = []
    for i in range(s):
        wi = w[:, i, None, None]
        st = st + wi[..., None] * fk[:, :, i, :, None] * vv[:, :, i, None, :]
        z = z + wi * fk[:, :, i]
        num = (fq[:, :, i, :, None] * st).sum(-2)
        den = (fq[:, :, i] * z).sum(-1, keepdim=True)
        outs.append(num / den.clamp_min(TINY))
    return torch.stack(outs, 2), st[:, ::g], z[:, ::g, :, None]


# -- ONNX ------------------------------------------------------------------------------------------


@onnx_translation(torch.ops.attnopt.linear_state_attention.default, "onnx", "onnxruntime")
def linear_state_attention_onnx(q, k, v, past_s, past_z, attention_mask, scale: float,
                                feature_map: str):
    """Standard opset-23 lowering of :func:`linear_state_attention` (see the module doc)."""
    from attnopt.variants.linear import _onnx_map, _onnx_project

    who, hint = "linear state attention", "export with static head sizes"
    h, d = static(q, 1, "head count", who=who, hint=hint), static(q, 3, "head dim", who=who,
                                                                  hint=hint)
    hkv = static(k, 1, "kv head count", who=who, hint=hint)
    dv = static(v, 3, "value dim", who=who, hint=hint)
    g, e = h // hkv, dv + 1
    fdim = state_features(feature_map, d)
    qf, kf, vf = (op.Cast(x, to=ir.DataType.FLOAT) for x in (q, k, v))
    s = op.Shape(q, start=2, end=3)                                      # [1]
    new = op.Slice(attention_mask, op.Neg(s), ints(np.iinfo(np.int64).max), ints(1))
    w = op.Unsqueeze(op.Cast(new, to=ir.DataType.FLOAT), ints(1, 3))    # [B, 1, S, 1]
    fq = _onnx_map(_onnx_project(qf, feature_map, scale, None, None), feature_map, d)
    fk = op.Mul(_onnx_map(_onnx_project(kf, feature_map, scale, None, None), feature_map, d), w)
    fq = op.Reshape(fq, ints(0, hkv, -1, fdim))                          # [B, Hkv, G·S, F]
    ones = op.ConstantOfShape(op.Concat(op.Shape(vf, end=3), ints(1), axis=0),
                              value=ir.tensor(np.array([1.0], dtype=np.float32)))
    v1 = op.Concat(vf, ones, axis=-1)                                    # [B, Hkv, S, Dv+1]
    state = op.Concat(op.Cast(past_s, to=ir.DataType.FLOAT),
                      op.Cast(past_z, to=ir.DataType.FLOAT), axis=-1)    # [B, Hkv, F, Dv+1]
    fk_t = op.Transpose(fk, perm=[0, 1, 3, 2])
    s0 = op.Squeeze(s)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    cols = op.Range(zero, s0, one)
    tri = op.Cast(op.LessOrEqual(cols, op.Unsqueeze(cols, ints(1))), to=ir.DataType.FLOAT)
    scores = op.Reshape(op.MatMul(fq, fk_t), op.Concat(ints(0, hkv, g, -1), s, axis=0))
    scores = op.Reshape(op.Mul(scores, tri), op.Concat(ints(0, hkv, -1), s, axis=0))
    o = op.Add(op.MatMul(scores, v1), op.MatMul(fq, state))             # [B, Hkv, G·S, Dv+1]
    present = op.Add(state, op.MatMul(fk_t, v1))
    num = op.Slice(o, ints(0), ints(dv), ints(3))
    den = op.Slice(o, ints(dv), ints(e), ints(3))
    out = op.Reshape(op.Div(num, op.Max(den, op.Constant(value_float=TINY))),
                     ints(0, h, -1, dv))
    return (op.CastLike(out, q), op.CastLike(op.Slice(present, ints(0), ints(dv), ints(3)), past_s),
            op.CastLike(op.Slice(present, ints(dv), ints(e), ints(3)), past_z))
