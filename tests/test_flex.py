"""FlexAttention forms of the sparse variants (their CUDA path), checked on CPU.

FlexAttention compiles through Inductor's C++ backend here (seconds per shape), so each variant
runs once, at one awkward shape: length not a multiple of the 128-token tiles, GQA, a padding
mask. The tile tables behind the block masks are checked without compiling anything.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import attnopt.variants.block_topk as btk
import attnopt.variants.neighborhood2d as nbh
import attnopt.variants.sliding_window as swa
import attnopt.variants.streaming as stm
from attnopt.variants import _flex

B, H, HKV, D = 1, 4, 2, 32
GRID, PREFIX = (15, 20), 1
L = PREFIX + GRID[0] * GRID[1]  # 301: three 128-token tiles, the last one partial
TOL = 2e-5

# name -> (flex form, reference, arguments after (q, k, v, mask) in the op's order)
CASES = {
    "sliding_window-causal": (_flex.sliding_window, swa.reference_sliding_window, (40, True)),
    "sliding_window-bidirectional": (_flex.sliding_window, swa.reference_sliding_window,
                                     (30, False)),
    "streaming": (_flex.streaming, stm.reference_streaming, (4, 60)),
    "block_topk-64": (_flex.block_topk, btk.reference_block_topk, (64, 2, True, True)),
    "block_topk-128": (_flex.block_topk, btk.reference_block_topk, (128, 1, False, True)),
    "neighborhood2d": (_flex.neighborhood2d, nbh.reference_neighborhood2d, (5, 1, *GRID)),
}


def _operands():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, HKV, L, D, generator=g)
    v = torch.randn(B, HKV, L, D, generator=g)
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[..., 250:270] = False  # padded keys inside some windows
    return q, k, v, keep


def _reference(ref, name, q, k, v, mask, args, scale):
    if name == "neighborhood2d":
        kernel, dilation, gh, gw = args
        return ref(q, k, v, mask, kernel, dilation, (gh, gw), scale)
    return ref(q, k, v, mask, *args, scale=scale)


@pytest.mark.parametrize("name", list(CASES))
def test_flex_form_matches_reference_on_cpu(name):
    flex, ref, args = CASES[name]
    q, k, v, keep = _operands()
    scale = D ** -0.5
    out = flex(q, k, v, keep, *args, scale)
    want = _reference(ref, name, q, k, v, keep, args, scale)
    assert out.shape == want.shape
    assert rel_err(want, out) < TOL


def test_fully_masked_rows_give_zero():
    q, k, v, _ = _operands()
    bias = torch.zeros(B, 1, L, L)
    bias[..., 7, :] = float("-inf")  # query 7 sees nothing
    out = _flex.sliding_window(q, k, v, bias, 40, True, D ** -0.5)
    want = swa.reference_sliding_window(q, k, v, bias, 40, True, D ** -0.5)
    assert rel_err(want, out) < TOL
    assert out[:, :, 7].abs().max().item() == 0.0


@pytest.mark.parametrize("lq,lk", [(300, 300), (256, 384), (129, 1000)])
def test_static_tile_tables_match_the_dense_pattern(lq, lk):
    pattern = _flex.sinks_band(5, 100)
    any_, all_ = _flex._static_tables(pattern, lq, lk, torch.device("cpu"))
    t = _flex.FLEX_BLOCK
    nq, nk = -(-lq // t), -(-lk // t)
    dense = pattern(torch.arange(lq)[:, None], torch.arange(lk)[None, :])
    for i in range(nq):
        for j in range(nk):
            tile = dense[i * t:(i + 1) * t, j * t:(j + 1) * t]
            assert bool(any_[0, 0, i, j]) == bool(tile.any()), (i, j)
            assert bool(all_[0, 0, i, j]) == bool(tile.all()), (i, j)


def test_neighborhood_pattern_equals_natten_reference():
    for dilation in (1, 2):
        pattern = _flex.neighborhood(PREFIX, GRID, 5, dilation)
        idx = torch.arange(L)
        got = pattern(idx[:, None], idx[None, :])
        want = nbh.neighborhood_pattern(L, GRID, 5, dilation)
        assert torch.equal(got, want), dilation


def test_dispatch_declines_what_flex_does_not_take():
    q = torch.randn(1, 2, 64, 32)
    k = torch.randn(1, 2, 64, 32)
    v = torch.randn(1, 2, 64, 48)  # Dv != D
    assert _flex.dispatch("sliding_window", q, k, v, None, 8, True, 0.1) is None
    assert _flex.block_topk(q, k, k, None, 96, 1, True, True, 0.1) is None  # 96 vs 128 tiles


def test_softcap_flex_form_matches_dense_reference():
    q, k, v, keep = _operands()
    scale, cap = D ** -0.5, 2.0
    out = _flex.softcap_attention(q, k, v, keep, True, scale, cap)
    rep = H // HKV
    s = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(-2, -1)) * scale
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~keep, float("-inf"))
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    want = (s.softmax(-1) @ v.double().repeat_interleave(rep, 1)).float()
    assert rel_err(want, out) < TOL
