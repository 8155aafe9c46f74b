"""The canonical fused op equals its slow reference (masks, causal, GQA, causal+padding)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from attnopt.variants.fused import attention, reference_attention


def _pad_mask(b, lk, drop):
    m = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    if drop:
        m[-1, ..., -drop:] = False
    return m


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=lambda h: f"Hkv{h}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "allones"])
def test_attention_matches_reference(hkv, causal, mask):
    b, h, lq, d = 2, 4, 37, 16
    q = torch.randn(b, h, lq, d)
    k = torch.randn(b, hkv, lq, d)
    v = torch.randn(b, hkv, lq, 8)
    m = None
    if mask == "bool":
        m = _pad_mask(b, lq, 5)
    elif mask == "allones":
        m = _pad_mask(b, lq, 0)
    elif mask == "float":
        m = torch.randn(b, 1, lq, lq)
    out = attention(q, k, v, m, causal, 0.3)
    ref = reference_attention(q, k, v, m, causal, 0.3)
    assert out.shape == (b, h, lq, 8) and out.is_contiguous()
    assert rel_err(ref, out) < 1e-5


def test_cross_attention_lengths():
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 19, 16), torch.randn(2, 4, 19, 16)
    assert rel_err(reference_attention(q, k, v, scale=0.25),
                   attention(q, k, v, None, False, 0.25)) < 1e-5


def test_fake_impl_gives_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 8, 5, 16), torch.empty(2, 2, 9, 16), torch.empty(2, 2, 9, 4)
        out = torch.ops.attnopt.attention(q, k, v, None, False, 1.0)
    assert tuple(out.shape) == (2, 8, 5, 4)
