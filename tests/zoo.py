"""Hand-written attention in the many ways real code spells it, and softmaxes that are not.

Each ``Case`` builds a small module and its inputs and says what the matcher must find. The
spellings follow real code: HF eager attention, timm ``Attention`` (fused qkv, ``fused_attn`` on
and off), nanoGPT (tril buffer), LLaMA reference (repeat_kv), T5 (relative bias, no scale),
ALiBi, einsum-style code (x-transformers), ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

B, L, H, D = 2, 12, 4, 8
E = H * D


@dataclass
class Case:
    """One module to optimize and what the matcher must report for it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    sites: int = 1
    fused: int | None = None  # sites rewritten (default: all)
    causal: bool | None = None
    kv_heads: int | None = None
    kind: str | None = None
    mask: str | None = None
    extra: dict = field(default_factory=dict)


def _x(b=B, l=L, e=E):  # noqa: E741
    return (torch.randn(b, l, e),)


class Proj(nn.Module):
    """q, k, v projections and an output projection, shared by the cases below."""

    def __init__(self, kv_heads: int = H, fused: bool = False) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        if fused:
            self.qkv = nn.Linear(E, 3 * E)
        else:
            self.q = nn.Linear(E, E)
            self.k = nn.Linear(E, kv_heads * D)
            self.v = nn.Linear(E, kv_heads * D)
        self.o = nn.Linear(E, E)

    def heads(self, x, kv=None):
        kv = x if kv is None else kv
        b, lq, _ = x.shape
        lk = kv.shape[1]
        q = self.q(x).view(b, lq, H, D).transpose(1, 2)
        k = self.k(kv).view(b, lk, self.kv_heads, D).transpose(1, 2)
        v = self.v(kv).view(b, lk, self.kv_heads, D).transpose(1, 2)
        return q, k, v

    def merge(self, o):
        b, _, lq, _ = o.shape
        return self.o(o.transpose(1, 2).reshape(b, lq, E))


class MulScale(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1)) * D**-0.5
        return self.merge(a.softmax(-1) @ v)


class DivScale(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
        return self.merge(torch.matmul(F.softmax(a, dim=-1), v))


class PreScaledQ(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        q = q * D**-0.5
        return self.merge((q @ k.mT).softmax(dim=-1) @ v)


class PreScaledQK(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        s = D**-0.25
        return self.merge(((q * s) @ (k * s).transpose(-1, -2)).softmax(-1) @ v)


class TensorScale(Proj):
    """Scale as a 0-d tensor computed from the head dim (``1 / sqrt(tensor(d))``)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        scale = torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float32))
        return self.merge(torch.softmax(q @ k.transpose(-2, -1) / scale, -1) @ v)


class PermutedKey(Proj):
    """k read as [B, L, H, D] and permuted straight to [B, H, D, L]."""

    def forward(self, x):
        b, l, _ = x.shape  # noqa: E741
        q = self.q(x).view(b, l, H, D).permute(0, 2, 1, 3)
        kt = self.k(x).view(b, l, H, D).permute(0, 2, 3, 1)
        v = self.v(x).view(b, l, H, D).permute(0, 2, 1, 3)
        return self.merge(((q @ kt) * D**-0.5).softmax(-1) @ v)


class PreTransposedKey(Proj):
    """k produced already transposed by the projection layout ([B, H, D, L])."""

    def forward(self, x):
        b, l, _ = x.shape  # noqa: E741
        q = self.q(x).view(b, l, H, D).transpose(1, 2)
        kt = self.k(x).transpose(1, 2).reshape(b, H, D, l)
        v = self.v(x).view(b, l, H, D).transpose(1, 2)
        return self.merge(((q @ kt) * D**-0.5).softmax(-1) @ v)


class FoldedBmm(Proj):
    """Heads folded into the batch: 3-D bmm (as fairseq / nn.MultiheadAttention internals)."""

    def forward(self, x):
        b, l, _ = x.shape  # noqa: E741
        q = self.q(x).view(b, l, H, D).transpose(1, 2).reshape(b * H, l, D) * D**-0.5
        k = self.k(x).view(b, l, H, D).transpose(1, 2).reshape(b * H, l, D)
        v = self.v(x).view(b, l, H, D).transpose(1, 2).reshape(b * H, l, D)
        p = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        o = torch.bmm(p, v).view(b, H, l, D)
        return self.merge(o)


class EinsumBHLD(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", a.softmax(-1), v))


class EinsumBLHD(Proj):
    """Einsum straight on [B, L, H, D] projections; output back in [B, L, H, D]."""

    def forward(self, x):
        b, l, _ = x.shape  # noqa: E741
        q = self.q(x).view(b, l, H, D)
        k = self.k(x).view(b, l, H, D)
        v = self.v(x).view(b, l, H, D)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
        o = torch.einsum("bhqk,bkhd->bqhd", a.softmax(dim=-1), v)
        return self.o(o.reshape(b, l, E))


class EinsumEllipsis(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        a = torch.einsum("...id,...jd->...ij", q, k) * D**-0.5
        return self.merge(torch.einsum("...ij,...jd->...id", a.softmax(-1), v))


class FusedQkvChunk(Proj):
    """timm-style fused qkv split by chunk; fused_attn=False path."""

    def __init__(self):
        super().__init__(fused=True)

    def forward(self, x):
        b, l, _ = x.shape  # noqa: E741
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, l, H, D).transpose(1, 2) for t in (q, k, v))
        return self.merge((q @ k.transpose(-2, -1) * D**-0.5).softmax(-1) @ v)


class FusedQkvUnbind(Proj):
    """timm Attention: reshape-permute-unbind of a fused qkv, q pre-scaled."""

    def __init__(self, fused_attn: bool = False):
        super().__init__(fused=True)
        self.fused_attn = fused_attn
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            q = q * D**-0.5
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            o = self.attn_drop(attn) @ v
        return self.o(o.transpose(1, 2).reshape(b, n, c))


class AdditiveMask(Proj):
    def forward(self, x, mask):
        q, k, v = self.heads(x)
        a = q @ k.transpose(-2, -1) * D**-0.5 + mask
        return self.merge(a.softmax(-1) @ v)


def _additive_mask():
    m = torch.zeros(B, 1, L, L)
    m[1, :, :, -3:] = float("-inf")
    return m


class BoolMaskedFill(Proj):
    def __init__(self, fill=float("-inf")):
        super().__init__()
        self.fill = fill

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1)) * D**-0.5
        a = a.masked_fill(~keep[:, None, None, :], self.fill)
        return self.merge(a.softmax(-1) @ v)


class FinfoMinMaskedFill(BoolMaskedFill):
    def __init__(self):
        super().__init__(fill=torch.finfo(torch.float32).min)


class BoolWhere(Proj):
    def forward(self, x, keep):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1)) * D**-0.5
        a = torch.where(keep[:, None, None, :], a, torch.finfo(a.dtype).min)
        return self.merge(a.softmax(-1) @ v)


def _keep():
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, -4:] = False
    return keep


class CausalTrilBuffer(Proj):
    """nanoGPT: a tril buffer sliced to the sequence length."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return self.merge(F.softmax(att, dim=-1) @ v)


class CausalOnTheFly(Proj):
    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(future, torch.finfo(att.dtype).min)
        return self.merge(att.softmax(-1) @ v)


class CausalAdditiveFloat(Proj):
    """A float causal mask (0 / -inf) made with triu and added to the scores."""

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        mask = torch.full((t, t), float("-inf")).triu(1)
        att = (q @ k.transpose(-2, -1)) * D**-0.5 + mask
        return self.merge(att.softmax(-1) @ v)


class CausalPlusPadding(Proj):
    """HF-style: causal and padding combined into one boolean mask, then where(min)."""

    def forward(self, x, attention_mask):
        t = x.shape[1]
        q, k, v = self.heads(x)
        i = torch.arange(t, device=x.device)
        causal = i[None, :] <= i[:, None]
        pad = attention_mask.bool()[:, None, None, :]
        allowed = causal[None, None] & pad
        bias = torch.where(allowed, 0.0, torch.finfo(q.dtype).min)
        att = (q @ k.transpose(-2, -1)) * D**-0.5 + bias
        return self.merge(att.softmax(-1) @ v)


def _attention_mask():
    m = torch.ones(B, L, dtype=torch.long)
    m[1, -3:] = 0
    return m


class EvalDropout(Proj):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        q, k, v = self.heads(x)
        p = self.drop(((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1))
        return self.merge(p @ v)


class Float32Softmax(Proj):
    """Softmax computed in float32 and cast back (LLaMA / HF eager style), in bfloat16."""

    def forward(self, x):
        q, k, v = self.heads(x)
        a = (q @ k.transpose(-2, -1)) * D**-0.5
        p = F.softmax(a, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(p @ v)


def repeat_kv(x, n):
    b, h, s, d = x.shape
    if n == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class GQARepeatKV(Proj):
    def __init__(self, kv_heads=2):
        super().__init__(kv_heads=kv_heads)

    def forward(self, x):
        q, k, v = self.heads(x)
        n = H // self.kv_heads
        k, v = repeat_kv(k, n), repeat_kv(v, n)
        a = (q @ k.transpose(2, 3)) * D**-0.5
        return self.merge(a.softmax(-1) @ v)


class GQARepeatInterleave(Proj):
    def __init__(self, kv_heads=2):
        super().__init__(kv_heads=kv_heads)

    def forward(self, x):
        q, k, v = self.heads(x)
        n = H // self.kv_heads
        k = k.repeat_interleave(n, dim=1)
        v = v.repeat_interleave(n, dim=1)
        return self.merge(((q @ k.transpose(-2, -1)) / D**0.5).softmax(-1) @ v)


class MQABroadcast(Proj):
    """MQA through matmul broadcasting: one kv head of size 1 broadcast over query heads."""

    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1) @ v)


class CrossAttention(Proj):
    def forward(self, x, memory):
        q, k, v = self.heads(x, memory)
        return self.merge(((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1) @ v)


class T5RelativeBias(Proj):
    """T5: no scale, a learned relative-position bias added to the scores."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(32, H)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        pos = torch.arange(t)
        rel = (pos[None, :] - pos[:, None]).clamp(-15, 16) + 15
        bias = self.rel(rel).permute(2, 0, 1).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(3, 2)) + bias
        p = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.merge(torch.matmul(p, v))


class ALiBi(Proj):
    def __init__(self):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])
        self.register_buffer("slopes", slopes)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        pos = torch.arange(t)
        alibi = self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs().neg()[None]
        att = (q @ k.transpose(-2, -1)) * D**-0.5 + alibi
        return self.merge(att.softmax(-1) @ v)


class Rotary(Proj):
    def __init__(self):
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        self.register_buffer("inv_freq", inv)

    def rope(self, x):
        t = torch.arange(x.shape[-2], dtype=torch.float32)
        f = torch.outer(t, self.inv_freq)
        emb = torch.cat([f, f], -1)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    def forward(self, x):
        q, k, v = self.heads(x)
        q, k = self.rope(q), self.rope(k)
        return self.merge(((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1) @ v)


class Baddbmm(Proj):
    """``baddbmm(mask, q, kᵀ, alpha=scale)`` as nn.MultiheadAttention's weights path writes it."""

    def forward(self, x, mask):
        b, l, _ = x.shape  # noqa: E741
        q, k, v = (t.reshape(b * H, l, D) for t in self.heads(x))
        s = torch.baddbmm(mask, q, k.transpose(-2, -1), alpha=D**-0.5)
        o = torch.bmm(s.softmax(-1), v).view(b, H, l, D)
        return self.merge(o)


def _bmm_mask():
    m = torch.zeros(B * H, L, L)
    m[:, :, -2:] = -1e9
    return m


class AlreadySDPA(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


class SDPAWithMask(Proj):
    def forward(self, x, keep):
        q, k, v = self.heads(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None]))


class MHA(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        out, _ = self.mha(x, x, x, need_weights=self.need_weights)
        return out


class MHAReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        out, w = self.mha(x, x, x)
        return out, w


class MHAMasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, pad):
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        return self.mha(x, x, x, attn_mask=causal, key_padding_mask=pad)[0]


def _pad():
    p = torch.zeros(B, L, dtype=torch.bool)
    p[1, -2:] = True
    return p


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=2 * E, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=2 * E, batch_first=True)

    def forward(self, x, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.layer(x, memory, tgt_mask=mask, tgt_is_causal=True)


class ReturnsWeights(Proj):
    def forward(self, x):
        q, k, v = self.heads(x)
        p = ((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1)
        return self.merge(p @ v), p


# -- issue 10: in-place score ops, tensor scales, heads regrouped on the score path ------------


class InplaceMaskedFill(Proj):
    """Stable-Diffusion-style CrossAttention: scores scaled and masked in place."""

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        sim = torch.einsum("bhid,bhjd->bhij", q, k)
        sim.mul_(D**-0.5)
        sim.masked_fill_(~keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        return self.merge(sim.softmax(dim=-1) @ v)


class InplaceBiasAdd(Proj):
    """T5-style codebases: ``scores += position_bias`` and ``scores /= sqrt(d)`` in place."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(32, H)

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        pos = torch.arange(t)
        bias = self.rel((pos[None, :] - pos[:, None]).clamp(-15, 16) + 15).permute(2, 0, 1)
        scores = torch.matmul(q, k.transpose(3, 2))
        scores /= math.sqrt(D)
        scores += bias[None]
        return self.merge(torch.matmul(scores.softmax(-1), v))


class InplaceOnView(Proj):
    """Scores kept as ``[B·H, L, L]``, masked in place through a ``[B, H, L, L]`` view."""

    def forward(self, x, keep):
        b, l, _ = x.shape  # noqa: E741
        q, k, v = (t.reshape(b * H, l, D) for t in self.heads(x))
        w = torch.bmm(q, k.transpose(1, 2))
        w.div_(math.sqrt(D))
        w.view(b, H, l, l).masked_fill_(~keep[:, None, None, :], float("-inf"))
        return self.merge(torch.bmm(w.softmax(-1), v).view(b, H, l, D))


class CosineAttention(Proj):
    """Swin-v2 cosine attention: normalised q, k and a learned per-head logit scale [H,1,1]."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(H, 1, 1) + 1))

    def forward(self, x):
        q, k, v = self.heads(x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        return self.merge(attn.softmax(dim=-1) @ v)


class XCiTTemperature(Proj):
    """XCiT cross-covariance attention: attention over channels with a per-head temperature."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, x):
        q, k, v = (t.transpose(-2, -1) for t in self.heads(x))  # [B, H, D, L]
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        out = attn.softmax(dim=-1) @ v  # [B, H, D, L]
        return self.merge(out.transpose(-2, -1))


class DynamicHeadDimScale(nn.Module):
    """An attention function on q, k, v inputs scaled by ``q.size(-1) ** -0.5``: the head dim
    stays dynamic, so the scale is a symbolic value in the graph (``math.sqrt`` would fix it)."""

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) / q.size(-1) ** 0.5
        return torch.matmul(F.softmax(scores, dim=-1), v)


def _qkv(b=B, h=H, l=L, d=D):  # noqa: E741
    return tuple(torch.randn(b, h, l, d) for _ in range(3))


class BloomStyle(nn.Module):
    """HF BLOOM eager attention: alibi through baddbmm on [B·H, L, D], fp32 softmax on a
    [B, H, L, L] view, causal+padding by masked_fill(finfo.min), bmm on [B·H, L, L]."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.dense = nn.Linear(E, E)
        self.inv_norm_factor = 1.0 / math.sqrt(D)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])
        self.register_buffer("slopes", slopes)

    def forward(self, x, attention_mask):
        b, q_length, _ = x.shape
        fused = self.qkv(x).view(b, q_length, H, 3, D)
        query, key, value = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        query = query.transpose(1, 2).reshape(b * H, q_length, D)
        key = key.permute(0, 2, 3, 1).reshape(b * H, D, q_length)
        value = value.transpose(1, 2).reshape(b * H, q_length, D)
        positions = (attention_mask.cumsum(-1) - 1) * attention_mask
        alibi = (self.slopes[None, :, None] * positions[:, None, :].to(x.dtype))
        alibi = alibi.reshape(b * H, 1, q_length)
        i = torch.arange(q_length)
        blocked = (i[None, :] > i[:, None])[None, None] | ~attention_mask.bool()[:, None, None, :]
        scores = alibi.baddbmm(batch1=query, batch2=key, beta=1.0, alpha=self.inv_norm_factor)
        scores = scores.view(b, H, q_length, q_length)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = probs.view(b * H, q_length, q_length)
        context = torch.bmm(probs, value).view(b, H, q_length, D)
        return self.dense(context.permute(0, 2, 1, 3).reshape(b, q_length, E))


class FairseqTimeFirst(nn.Module):
    """fairseq MultiheadAttention (no fast path): [T, B, C] inputs, ``q *= scaling``, bmm on
    [B·H, T, d], key_padding_mask through a [B, H, T, S] view, fp32 softmax then type_as."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))
        self.scaling = D**-0.5

    def forward(self, query, key_padding_mask):
        tgt_len, bsz, embed_dim = query.size()
        q = self.q_proj(query)
        k = self.k_proj(query)
        v = self.v_proj(query)
        q *= self.scaling
        q = q.contiguous().view(tgt_len, bsz * H, D).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * H, D).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * H, D).transpose(0, 1)
        src_len = k.size(1)
        attn_weights = torch.bmm(q, k.transpose(1, 2))
        attn_weights = attn_weights.view(bsz, H, tgt_len, src_len)
        attn_weights = attn_weights.masked_fill(
            key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
        attn_weights = attn_weights.view(bsz * H, tgt_len, src_len)
        attn_weights_float = F.softmax(attn_weights, dim=-1, dtype=torch.float32)
        attn_probs = attn_weights_float.type_as(attn_weights)
        attn = torch.bmm(attn_probs, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)


def _time_first():
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -3:] = True
    return torch.randn(L, B, E), pad


class SAGANSelfAttention(nn.Module):
    """SAGAN / non-local block: 1×1 conv q, k, v; one head, no scale; out = bmm(V, Aᵀ)."""

    def __init__(self, c=16):
        super().__init__()
        self.query_conv = nn.Conv2d(c, c // 8, 1)
        self.key_conv = nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        b, c, w, h = x.size()
        proj_query = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)  # B x N x C'
        proj_key = self.key_conv(x).view(b, -1, w * h)  # B x C' x N
        energy = torch.bmm(proj_query, proj_key)
        attention = F.softmax(energy, dim=-1)
        proj_value = self.value_conv(x).view(b, -1, w * h)  # B x C x N
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, w, h)
        return self.gamma * out + x


def _window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)


def _window_reverse(windows, ws, h, w):
    x = windows.view(-1, h // ws, w // ws, ws, ws, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, x.shape[-1])


class SwinWindowBlock(nn.Module):
    """Swin v1 shifted-window attention written by hand: roll, window partition, relative
    position bias from a table, shift mask through a [B, nW, H, N, N] view and back."""

    def __init__(self, res=8, ws=4, shift=2):
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        n = ws * ws
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.scale = D**-0.5
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * ws - 1) ** 2, H))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        flat = coords.flatten(1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        img_mask = torch.zeros(1, res, res, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img_mask[:, hs, wsl, :] = cnt
                cnt += 1
        mw = _window_partition(img_mask, ws).view(-1, n)
        attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x):
        b, hw, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = _window_partition(x, self.ws)
        b_, n, _ = windows.shape
        qkv = self.qkv(windows).reshape(b_, n, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        nw = self.attn_mask.shape[0]
        attn = attn.view(b_ // nw, nw, H, n, n) + self.attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, H, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        out = _window_reverse(self.proj(out), self.ws, self.res, self.res)
        out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        return out.view(b, hw, c)


class SoftCapping(Proj):
    """Gemma-2 eager attention: logits soft-capped by ``tanh(scores / c) * c``, then causal."""

    def __init__(self, cap=5.0):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        t = x.shape[1]
        q, k, v = self.heads(x)
        scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        scores = scores / self.cap
        scores = torch.tanh(scores)
        scores = scores * self.cap
        causal = torch.full((t, t), torch.finfo(x.dtype).min).triu(1)
        scores = scores + causal
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(p, v))


def _xm():
    return (torch.randn(B, L, E), torch.randn(B, L + 5, E))


_RESIZED = {"resized": True}

CASES: list[Case] = [
    Case("mul_scale", MulScale, _x),
    Case("div_scale", DivScale, _x),
    Case("prescaled_q", PreScaledQ, _x),
    Case("prescaled_qk", PreScaledQK, _x),
    Case("tensor_scale", TensorScale, _x),
    Case("permuted_key", PermutedKey, _x),
    Case("pretransposed_key", PreTransposedKey, _x),
    Case("folded_bmm", FoldedBmm, _x),
    Case("einsum_bhld", EinsumBHLD, _x),
    Case("einsum_blhd", EinsumBLHD, _x),
    Case("einsum_ellipsis", EinsumEllipsis, _x),
    Case("fused_qkv_chunk", FusedQkvChunk, _x),
    Case("fused_qkv_unbind", FusedQkvUnbind, _x),
    Case("timm_fused_attn", lambda: FusedQkvUnbind(fused_attn=True), _x),
    Case("additive_mask", AdditiveMask, lambda: (*_x(), _additive_mask()), mask="mask"),
    Case("bool_masked_fill", BoolMaskedFill, lambda: (*_x(), _keep()), mask="padding"),
    Case("finfo_min_masked_fill", FinfoMinMaskedFill, lambda: (*_x(), _keep()), mask="padding"),
    Case("bool_where", BoolWhere, lambda: (*_x(), _keep()), mask="padding"),
    Case("causal_tril_buffer", CausalTrilBuffer, _x, causal=True, mask="causal"),
    Case("causal_on_the_fly", CausalOnTheFly, _x, causal=True, mask="causal"),
    Case("causal_additive_float", CausalAdditiveFloat, _x, causal=True, mask="causal"),
    Case("causal_plus_padding", CausalPlusPadding, lambda: (*_x(), _attention_mask()),
         causal=True, mask="causal+padding"),
    Case("eval_dropout", EvalDropout, _x),
    Case("float32_softmax_bf16", Float32Softmax,
         lambda: (torch.randn(B, L, E, dtype=torch.bfloat16),),
         extra={"dtype": torch.bfloat16}),
    Case("gqa_repeat_kv", GQARepeatKV, _x, kv_heads=2),
    Case("gqa_repeat_interleave", GQARepeatInterleave, _x, kv_heads=2),
    Case("mqa_broadcast", MQABroadcast, _x, kv_heads=1),
    Case("cross_attention", CrossAttention, _xm, kind="cross"),
    Case("t5_relative_bias", T5RelativeBias, _x, mask="bias"),
    Case("alibi", ALiBi, _x, mask="bias"),
    Case("rotary", Rotary, _x),
    Case("baddbmm", Baddbmm, lambda: (*_x(), _bmm_mask())),
    Case("already_sdpa", AlreadySDPA, _x, causal=True),
    Case("sdpa_with_mask", SDPAWithMask, lambda: (*_x(), _keep())),
    Case("mha_need_weights_unused", lambda: MHA(True), _x),
    Case("mha_no_weights", lambda: MHA(False), _x),
    Case("mha_masks", MHAMasks, lambda: (*_x(), _pad())),
    Case("transformer_encoder_layer", EncoderLayer, _x),
    Case("transformer_decoder_layer", DecoderLayer, _xm, sites=2),
    Case("returns_weights", ReturnsWeights, _x, fused=0),
    Case("mha_returns_weights", MHAReturnsWeights, _x, fused=0),

    # Issue 10: each also verified on a second input size while optimizing.
    Case("inplace_masked_fill", InplaceMaskedFill, lambda: (*_x(), _keep()), mask="padding",
         extra=_RESIZED),
    Case("inplace_bias_add", InplaceBiasAdd, _x, mask="bias", extra=_RESIZED),
    Case("inplace_on_view", InplaceOnView, lambda: (*_x(), _keep()), mask="padding",
         extra=_RESIZED),
    Case("cosine_logit_scale", CosineAttention, _x, extra=_RESIZED),
    Case("xcit_temperature", XCiTTemperature, _x, extra=_RESIZED),
    Case("dynamic_head_dim_scale", DynamicHeadDimScale, _qkv, extra=_RESIZED),
    Case("bloom_baddbmm_alibi", BloomStyle, lambda: (*_x(), _attention_mask()), causal=True,
         extra=_RESIZED),
    Case("fairseq_time_first", FairseqTimeFirst, _time_first, mask="padding", extra=_RESIZED),
    Case("sagan_transposed_out", SAGANSelfAttention, lambda: (torch.randn(B, 16, 6, 6),),
         extra=_RESIZED),
    Case("swin_window", SwinWindowBlock, lambda: (torch.randn(B, 64, E),), mask="bias",
         extra=_RESIZED),
    Case("soft_capping", SoftCapping, _x, causal=True, extra=_RESIZED),
]


# -- softmaxes that are NOT attention: never rewritten ------------------------------------------


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(E, 10)

    def forward(self, x):
        return self.fc(x.mean(1)).softmax(-1)


class MoERouter(nn.Module):
    """Top-2 router: softmax over experts, then a weighted sum of expert outputs."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(E, experts)
        self.experts = nn.ModuleList(nn.Linear(E, E) for _ in range(experts))

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, L, X, E]
        return torch.einsum("blx,blxe->ble", probs, outs)


class RouterMatmul(nn.Module):
    """Router probabilities combined with a matmul over experts (looks like p @ v)."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(E, experts)
        self.experts = nn.ModuleList(nn.Linear(E, E) for _ in range(experts))

    def forward(self, x):
        probs = self.router(x).softmax(-1).unsqueeze(-2)  # [B, L, 1, X]
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, L, X, E]
        return (probs @ outs).squeeze(-2)


class LearnedMixing(nn.Module):
    """Softmax over learned layer-mixing weights (ELMo scalar mix)."""

    def __init__(self, n=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))
        self.layers = nn.ModuleList(nn.Linear(E, E) for _ in range(n))

    def forward(self, x):
        hs = torch.stack([layer(x) for layer in self.layers], 0)  # [n, B, L, E]
        w = self.w.softmax(0)
        return torch.einsum("n,nble->ble", w, hs)


class LearnedMixingMatmul(nn.Module):
    """Learned mixing weights as a softmaxed matrix contracted with a matmul."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(L, L))

    def forward(self, x):
        return self.logits.softmax(-1) @ x


class LogSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(E, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(x), -1)


class SpatialSoftmax(nn.Module):
    """Keypoint spatial softmax: softmax over HW of a conv feature map, then expected coords."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16),
                                indexing="ij")
        self.register_buffer("coords", torch.stack([xs.flatten(), ys.flatten()], -1))

    def forward(self, img):
        f = self.conv(img).flatten(2)  # [B, C, HW]
        p = f.softmax(-1)
        return p @ self.coords  # [B, C, 2]


class SoftmaxOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, E)

    def forward(self, x):
        q = self.q(x)
        return (q @ x.transpose(-2, -1)).softmax(-1)


NEGATIVES: list[Case] = [
    Case("classifier", Classifier, _x, sites=0),
    Case("moe_router", MoERouter, _x, sites=0),
    Case("router_matmul", RouterMatmul, _x, sites=0),
    Case("learned_mixing", LearnedMixing, _x, sites=0),
    Case("learned_mixing_matmul", LearnedMixingMatmul, lambda: (torch.randn(B, L, E),), sites=0),
    Case("log_softmax", LogSoftmax, _x, sites=0),
    Case("spatial_softmax", SpatialSoftmax, lambda: (torch.randn(B, 3, 16, 16),), sites=0),
    Case("softmax_is_output", SoftmaxOutput, _x, sites=0),
]
