"""Property: for random attention shapes, scales (constant or per head), masks, GQA ratios and
spellings (out-of-place or in place), find+fuse finds the site, fuses it, and never changes the
output."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.report import FUSED


class RandomAttention(nn.Module):
    """Attention spelled as ``spec`` says; q/k/v come straight from the inputs."""

    def __init__(self, spec: dict, heads: int = 1) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(heads)
        self.head_scale = nn.Parameter(torch.rand(heads, 1, 1, generator=g) + 0.1)

    def forward(self, q, k, v, pad):
        s = self.spec
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            if s["gqa"] == "repeat_kv":
                b, h, n, d = k.shape
                k = k[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)
                v = v[:, :, None].expand(b, h, rep, n, v.shape[-1]).reshape(b, h * rep, n, -1)
            else:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        scale = s["scale"]
        if s["scale_at"] == "q":
            q = q * scale
        if s["spelling"] == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            scores = q @ k.transpose(-2, -1)
        inplace = s["inplace"]
        if s["scale_at"] == "mul":
            scores = scores.mul_(scale) if inplace else scores * scale
        elif s["scale_at"] == "div":
            scores = scores.div_(1.0 / scale) if inplace else scores / (1.0 / scale)
        elif s["scale_at"] == "head":  # a learned per-head temperature [H, 1, 1]
            scores = scores.mul_(self.head_scale) if inplace else scores * self.head_scale
        lq, lk = scores.shape[-2:]
        if s["mask"] == "causal":
            future = torch.ones(lq, lk, dtype=torch.bool).triu(1)
            if inplace:
                scores.masked_fill_(future, float("-inf"))
            else:
                scores = scores.masked_fill(future, float("-inf"))
        elif s["mask"] == "padding":
            keep = pad[:, None, None, :]
            if inplace:
                scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
            else:
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        elif s["mask"] == "float":
            bias = torch.where(pad, 0.0, -1e9)[:, None, None, :]
            if inplace:
                scores += bias
            else:
                scores = scores + bias
        p = scores.float().softmax(-1).to(q.dtype) if s["fp32_softmax"] else scores.softmax(-1)
        if s["spelling"] == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd", p, v)
        return p @ v


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    mask = draw(st.sampled_from(["none", "causal", "padding", "float"]))
    lq = draw(st.integers(2, 33))
    lk = lq if mask == "causal" else draw(st.integers(2, 33))
    spec = {
        "gqa": draw(st.sampled_from(["repeat_kv", "repeat_interleave"])),
        "scale": draw(st.floats(0.05, 2.0)),
        "scale_at": draw(st.sampled_from(["mul", "div", "q", "head"])),
        "inplace": draw(st.booleans()),
        "spelling": draw(st.sampled_from(["matmul", "einsum"])),
        "mask": mask,
        "fp32_softmax": draw(st.booleans()),
    }
    b = draw(st.integers(2, 3))
    d = draw(st.sampled_from([4, 8, 16]))
    dv = draw(st.sampled_from([d, 8]))
    pad = torch.ones(b, lk, dtype=torch.bool)
    pad[-1, lk - draw(st.integers(0, lk - 1)):] = False
    shapes = (b, heads, kv_heads, lq, lk, d, dv)
    return spec, shapes, pad


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_cases())
def test_find_and_fuse_never_changes_the_output(case):
    spec, (b, h, hkv, lq, lk, d, dv), pad = case
    g = torch.Generator().manual_seed(hash((b, h, hkv, lq, lk, d, dv)) % 2**31)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, dv, generator=g)
    model = RandomAttention(spec, heads=h)
    fast = attnopt.optimize(model, (q, k, v, pad))
    report = fast.report
    assert report.count(FUSED) == 1, (spec, report.table())
    site = report.sites[0]
    assert site.causal == (spec["mask"] == "causal")
    expected_scale = spec["scale"]
    if spec["scale_at"] == "head":  # folded into q; one head makes it a plain constant
        expected_scale = model.head_scale.item() if h == 1 else 1.0
    assert math.isclose(site.scale, expected_scale, rel_tol=1e-6)
    if hkv < h:
        assert site.kv_heads == hkv
    with torch.no_grad():
        ref, out = model(q, k, v, pad), fast(q, k, v, pad)
    assert attnopt.verify.compare(ref, out).rel <= 1e-5
