"""Sparse variants: fast blocked kernels vs their dense references, semantics, sites, pipeline."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
import attnopt.variants.block_topk as btk
import attnopt.variants.neighborhood2d as nbh
import attnopt.variants.sliding_window as swa
import attnopt.variants.streaming as stm
from attnopt.errors import ConfigError
from attnopt.report import FUSED, LEFT_EXACT, REWRITTEN
from attnopt.variants import _sparse
from attnopt.variants._base import Variant

TOL = 2e-5  # fp32 kernel vs float64 reference, relative to the output's scale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small problems: intra-op threads only add barrier waits on the shared 2-core machines."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
MASKS = (None, "key-bool", "key-float", "full-bool", "full-float", "head-key-bool")


@contextlib.contextmanager
def chunk_bytes(n: int | None):
    """Run with a smaller chunk budget (many chunks: exercises edge / interior splits)."""
    old = _sparse.CHUNK_BYTES
    _sparse.CHUNK_BYTES = n or old
    try:
        yield
    finally:
        _sparse.CHUNK_BYTES = old


def make_mask(kind: str | None, b: int, h: int, lq: int, lk: int, gen: torch.Generator):
    """A mask of the given kind (True / 0 = attend); padded keys as HF builds them."""
    if kind is None:
        return None
    if kind.startswith("key") or kind.startswith("head"):
        heads = h if kind.startswith("head") else 1
        keep = torch.rand(b, heads, 1, lk, generator=gen) > 0.25
        keep[..., 0] = True  # every row keeps one key somewhere
    else:
        keep = torch.rand(b, 1, lq, lk, generator=gen) > 0.4
    if kind.endswith("bool"):
        return keep
    # additive float: finite fill (as HF's eager masks) plus a small bias
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min) + \
        0.1 * torch.randn(keep.shape, generator=gen)


def make_qkv(b, h, hkv, lq, lk, d, dv, gen):
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, dv, generator=gen)
    return q, k, v


heads_st = st.sampled_from([(1, 1), (2, 2), (4, 2), (6, 3), (4, 1)])


# -- configs ---------------------------------------------------------------------------------------

CONFIGS = [
    swa.SlidingWindow(window=512),
    swa.SlidingWindow(window=64, causal=True),
    stm.Streaming(sinks=4, window=1024),
    btk.BlockTopK(block=64, k=8),
    nbh.Neighborhood2D(kernel=7, dilation=2, grid=(32, 32)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_config_round_trips_through_json_data(config):
    import json

    data = json.loads(json.dumps(config.to_dict()))
    assert Variant.from_dict(data) == config


@pytest.mark.parametrize("cls, kwargs", [
    (swa.SlidingWindow, {"window": 0}),
    (swa.SlidingWindow, {"window": 8, "causal": "yes"}),
    (swa.SlidingWindow, {"window": True}),
    (stm.Streaming, {"sinks": -1, "window": 8}),
    (stm.Streaming, {"sinks": 4, "window": 0}),
    (btk.BlockTopK, {"block": 0, "k": 2}),
    (btk.BlockTopK, {"block": 64, "k": -1}),
    (nbh.Neighborhood2D, {"kernel": 4}),
    (nbh.Neighborhood2D, {"kernel": 3, "dilation": 0}),
    (nbh.Neighborhood2D, {"kernel": 7, "grid": (6, 30)}),
    (nbh.Neighborhood2D, {"kernel": 3, "grid": (6,)}),
], ids=str)
def test_config_rejects_bad_values(cls, kwargs):
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_grid_from_json_list_becomes_a_tuple():
    cfg = Variant.from_dict({"variant": "neighborhood2d", "kernel": 3, "dilation": 1,
                             "grid": [14, 14]})
    assert cfg.grid == (14, 14) and cfg == nbh.Neighborhood2D(kernel=3, grid=(14, 14))


# -- fast kernels == dense references --------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(heads=heads_st, b=st.integers(1, 2), lq=st.integers(1, 300), d=st.sampled_from([4, 16]),
       window=st.integers(1, 320), causal=st.booleans(), mask=st.sampled_from(MASKS),
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_sliding_window_equals_reference(heads, b, lq, d, window, causal, mask, small, seed):
    gen = torch.Generator().manual_seed(seed)
    h, hkv = heads
    q, k, v = make_qkv(b, h, hkv, lq, lq, d, d + 2, gen)
    m = make_mask(mask, b, h, lq, lq, gen)
    with chunk_bytes(4096 if small else None):
        out = swa.sliding_window(q, k, v, m, window, causal, 0.3)
    ref = swa.reference_sliding_window(q, k, v, m, window, causal, 0.3)
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(ref, out) < TOL


@settings(max_examples=30, deadline=None)
@given(heads=heads_st, b=st.integers(1, 2), lq=st.integers(1, 300), d=st.sampled_from([4, 16]),
       sinks=st.integers(0, 40), window=st.integers(1, 200), mask=st.sampled_from(MASKS),
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_streaming_equals_reference(heads, b, lq, d, sinks, window, mask, small, seed):
    gen = torch.Generator().manual_seed(seed)
    h, hkv = heads
    q, k, v = make_qkv(b, h, hkv, lq, lq, d, d, gen)
    m = make_mask(mask, b, h, lq, lq, gen)
    with chunk_bytes(4096 if small else None):
        out = stm.streaming(q, k, v, m, sinks, window, 0.25)
    ref = stm.reference_streaming(q, k, v, m, sinks, window, 0.25)
    assert rel_err(ref, out) < TOL


@settings(max_examples=30, deadline=None)
@given(heads=heads_st, b=st.integers(1, 2), lq=st.integers(1, 260), d=st.sampled_from([4, 16]),
       block=st.sampled_from([4, 8, 16, 24, 64]), topk=st.integers(0, 6),
       kind=st.sampled_from(["self", "causal", "cross"]), lk=st.integers(1, 200),
       mask=st.sampled_from(MASKS), small=st.booleans(), seed=st.integers(0, 2**16))
def test_block_topk_equals_reference(heads, b, lq, d, block, topk, kind, lk, mask, small, seed):
    gen = torch.Generator().manual_seed(seed)
    h, hkv = heads
    lk = lk if kind == "cross" else lq
    topk = max(topk, 1) if kind == "cross" else topk
    q, k, v = make_qkv(b, h, hkv, lq, lk, d, d + 1, gen)
    m = make_mask(mask, b, h, lq, lk, gen)
    causal, own = kind == "causal", kind != "cross"
    with chunk_bytes(2048 if small else None):
        out = btk.block_topk(q, k, v, m, block, topk, causal, own, 0.5)
    ref = btk.reference_block_topk(q, k, v, m, block, topk, causal, own, 0.5)
    assert rel_err(ref, out) < TOL


@st.composite
def grids(draw):
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.integers(1, 3))
    low = kernel * dilation
    gh = draw(st.integers(low, low + 12))
    gw = draw(st.integers(low, low + 12))
    return kernel, dilation, (gh, gw), draw(st.integers(0, 3))


@settings(max_examples=30, deadline=None)
@given(heads=heads_st, b=st.integers(1, 2), grid=grids(), d=st.sampled_from([4, 16]),
       mask=st.sampled_from(MASKS), small=st.booleans(), seed=st.integers(0, 2**16))
def test_neighborhood2d_equals_reference(heads, b, grid, d, mask, small, seed):
    gen = torch.Generator().manual_seed(seed)
    kernel, dilation, (gh, gw), prefix = grid
    h, hkv = heads
    n = prefix + gh * gw
    q, k, v = make_qkv(b, h, hkv, n, n, d, d, gen)
    m = make_mask(mask, b, h, n, n, gen)
    with chunk_bytes(8192 if small else None):
        out = nbh.neighborhood2d(q, k, v, m, kernel, dilation, gh, gw, 0.4)
    ref = nbh.reference_neighborhood2d(q, k, v, m, kernel, dilation, (gh, gw), 0.4)
    assert rel_err(ref, out) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (t.to(dtype) for t in make_qkv(1, 4, 2, 70, 70, 16, 16, gen))
    out = swa.sliding_window(q, k, v, None, 9, True, 0.25)
    ref = swa.reference_sliding_window(q.float(), k.float(), v.float(), None, 9, True, 0.25)
    assert out.dtype == dtype and rel_err(ref, out.float()) < 2e-2


def test_fully_masked_rows_are_zero_not_nan():
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, 8, gen)
    keep = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    keep[..., :20] = False  # queries 0..9 see only masked keys in a causal window of 10
    out = swa.sliding_window(q, k, v, keep, 10, True, 0.3)
    assert torch.isfinite(out).all() and out[:, :, :10].abs().max() == 0
    assert out[:, :, 30:].abs().min() > 0


def test_block_size_and_chunking_do_not_change_the_result():
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(1, 4, 2, 333, 333, 8, 8, gen)
    runner = _sparse.BlockedRunner(q, k, v, None, 0.3)
    outs = []
    for block in (16, 32, 64, 128):
        for budget in (2048, None):
            with chunk_bytes(budget):
                outs.append(runner.run(_sparse.BandPlan(runner, lo=20, hi=20, block=block)))
    assert all(rel_err(outs[0], o) < 1e-6 for o in outs[1:])


def test_no_quadratic_allocation():
    """At 8k tokens the largest allocation is one chunk, far below the N×N scores."""
    n = 8192
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 1, 1, n, n, 8, 8, gen)
    from torch.profiler import profile

    calls = [lambda: swa.sliding_window(q, k, v, None, 256, False, 0.3),
             lambda: stm.streaming(q, k, v, None, 4, 256, 0.3),
             lambda: btk.block_topk(q, k, v, None, 64, 4, True, True, 0.3)]
    for call in calls:
        with chunk_bytes(1 << 20), profile(profile_memory=True) as prof:
            call()
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert biggest <= 4 << 20, biggest  # the N×N scores would be 256 MiB


# -- pattern semantics -----------------------------------------------------------------------------


def test_window_semantics_match_the_conventions():
    causal = swa.window_pattern(10, 10, 3, True)
    assert causal[5].nonzero().flatten().tolist() == [3, 4, 5]  # last 3 keys including self
    both = swa.window_pattern(10, 10, 2, False)
    assert both[5].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]  # |i - j| <= 2
    s = stm.streaming_pattern(12, 12, 2, 3)
    assert s[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert s[1].nonzero().flatten().tolist() == [0, 1]
    assert stm.streaming_pairs(12, 12, 2, 3) == int(s.sum())


def test_neighborhood_windows_follow_natten():
    w = nbh.window_1d(9, 3, 1)
    assert (w.sum(1) == 3).all()
    assert w[0].nonzero().flatten().tolist() == [0, 1, 2]  # shifted inwards at the border
    assert w[4].nonzero().flatten().tolist() == [3, 4, 5]  # centred inside
    assert w[8].nonzero().flatten().tolist() == [6, 7, 8]
    d = nbh.window_1d(10, 3, 2)
    assert d[4].nonzero().flatten().tolist() == [2, 4, 6]  # same residue class, dilated
    assert d[1].nonzero().flatten().tolist() == [1, 3, 5]
    p = nbh.neighborhood_pattern(1 + 36, (6, 6), 3, 1)
    assert p[0].all() and p[:, 0].all() and (p[1:, 1:].sum(1) == 9).all()
    assert int(p.sum()) == nbh.neighborhood_pairs(37, (6, 6), 3)


def _naive_routing(q, k, block, topk, causal, own):
    """Per query block: mean query · mean key of each block, best k candidates (slow loops)."""
    b, h, lq, _ = q.shape
    g = h // k.shape[1]
    nqb, nkb = -(-lq // block), -(-k.shape[2] // block)
    chosen = set()
    for bi in range(b):
        for hi in range(h):
            kk = k[bi, hi // g]
            for i in range(nqb):
                qm = q[bi, hi, i * block:(i + 1) * block].mean(0)
                scores = []
                for j in range(nkb):
                    if (causal and j >= i) or (own and not causal and j == i):
                        continue
                    scores.append((float(qm @ kk[j * block:(j + 1) * block].mean(0)), j))
                for _, j in sorted(scores, reverse=True)[:topk]:
                    chosen.add((bi, hi, i, j))
    return chosen


@pytest.mark.parametrize("causal, own", [(False, True), (True, True), (False, False)])
def test_routing_selects_the_best_blocks_by_mean_key(causal, own):
    gen = torch.Generator().manual_seed(3)
    q, k, _ = make_qkv(2, 4, 2, 45, 45, 8, 8, gen)
    idx, valid = btk.select_blocks(q, k, None, 8, 2, causal, own)
    got = {(b, h, i, int(idx[b, h, i, s])) for b, h, i, s in valid.nonzero().tolist()}
    assert got == _naive_routing(q, k, 8, 2, causal, own)


def test_routing_skips_fully_padded_blocks():
    gen = torch.Generator().manual_seed(4)
    q, k, _ = make_qkv(1, 2, 2, 64, 64, 8, 8, gen)
    k[:, :, 48:] *= 50  # the last block would win every gate if it were not padding
    keep = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    keep[..., 48:] = False
    idx, valid = btk.select_blocks(q, k, keep[:, :, :, :], 16, 1, False, True)
    assert not ((idx == 3) & valid).any()
    idx, valid = btk.select_blocks(q, k, None, 16, 1, False, True)
    assert ((idx == 3) & valid).any()


# -- sites -----------------------------------------------------------------------------------------


def _site(**changes) -> attnopt.AttentionSite:
    base = dict(index=0, location="layer.0", module_type="Attn", spelling="sdpa",
                already_fused=True, kind="self", batch=2, heads=4, kv_heads=2, q_len=1024,
                kv_len=1024, head_dim=64, value_dim=64, dynamic=(), scale=0.125, causal=False,
                window=None, mask="padding", dtype="float32")
    fields = {**base, **changes}
    fields.setdefault("mask_kinds", tuple(k for k in fields["mask"].split("+") if k != "none"))
    return attnopt.AttentionSite(**fields)


CAUSAL = {"causal": True, "mask": "causal+padding"}


@pytest.mark.parametrize("config, changes, reason", [
    (swa.SlidingWindow(window=8), {"kind": "cross", "kv_len": 300}, "Lq=1024 != Lk=300"),
    (swa.SlidingWindow(window=8, causal=False), CAUSAL, "future keys"),
    (swa.SlidingWindow(window=8, causal=True), {}, "bidirectional"),
    (stm.Streaming(sinks=4, window=8), {}, "bidirectional"),
    (stm.Streaming(sinks=4, window=8), {"kind": "cross"}, "cross attention"),
    (btk.BlockTopK(block=8, k=2), {**CAUSAL, "kind": "cross", "kv_len": 64}, "causal cross"),
    (btk.BlockTopK(block=8, k=0), {"kind": "cross", "kv_len": 64}, "k >= 1"),
    (nbh.Neighborhood2D(kernel=3, grid=(32, 32)), CAUSAL, "causal"),
    (nbh.Neighborhood2D(kernel=3, grid=(40, 40)), {}, "shorter than the grid"),
    (nbh.Neighborhood2D(kernel=3, grid=(32, 32)), {"kind": "cross"}, "self attention"),
    (swa.SlidingWindow(window=8), {"fusable": False, "reason": "weights returned"},
     "weights returned"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_can_apply_refuses_with_a_reason(config, changes, reason):
    got = attnopt.variants.implementation(config).can_apply(config, _site(**changes))
    assert got is not None and reason in got, got


@pytest.mark.parametrize("config, changes", [
    (swa.SlidingWindow(window=8), {}),
    (swa.SlidingWindow(window=8), CAUSAL),
    (swa.SlidingWindow(window=8, causal=True), {"mask": "causal window=16+padding",
                                                "window": 16}),
    (stm.Streaming(sinks=4, window=8), CAUSAL),
    (btk.BlockTopK(block=8, k=2), {"kind": "cross", "kv_len": 64}),
    (btk.BlockTopK(block=8, k=2), CAUSAL),
    (nbh.Neighborhood2D(kernel=3, grid=(32, 32)), {"mask": "none"}),
])
def test_can_apply_accepts(config, changes):
    assert attnopt.variants.implementation(config).can_apply(config, _site(**changes)) is None


def test_densities_count_the_pattern_against_exact_pairs():
    n = 1024
    sw = swa.SlidingWindow(window=64)
    impl = attnopt.variants.implementation(sw)
    bidir = impl.density(sw, _site(q_len=n, kv_len=n))
    assert bidir == pytest.approx(int(swa.window_pattern(n, n, 64, False).sum()) / n**2)
    causal = impl.density(sw, _site(q_len=n, kv_len=n, **CAUSAL))
    assert causal == pytest.approx(int(swa.window_pattern(n, n, 64, True).sum())
                                   / (n * (n + 1) / 2))
    s = stm.Streaming(sinks=4, window=64)
    assert attnopt.variants.implementation(s).density(s, _site(**CAUSAL)) == pytest.approx(
        int(stm.streaming_pattern(n, n, 4, 64).sum()) / (n * (n + 1) / 2))
    bt = btk.BlockTopK(block=64, k=3)
    d_bt = attnopt.variants.implementation(bt).density(bt, _site())
    assert d_bt == pytest.approx(4 * 64 / n)
    na = nbh.Neighborhood2D(kernel=5, grid=(32, 32))
    d_na = attnopt.variants.implementation(na).density(na, _site(q_len=1025, kv_len=1025))
    assert d_na == pytest.approx(int(nbh.neighborhood_pattern(1025, (32, 32), 5, 1).sum())
                                 / 1025**2)


def test_block_topk_density_matches_the_selected_pattern_on_full_blocks():
    gen = torch.Generator().manual_seed(0)
    q, k, _ = make_qkv(1, 1, 1, 256, 256, 8, 8, gen)
    for causal in (False, True):
        pattern = btk.topk_pattern(q, k, None, 32, 3, causal, True)
        assert int(pattern.sum()) == btk.topk_pairs(256, 256, 32, 3, causal, True)


# -- pipeline --------------------------------------------------------------------------------------


def _targets(fast):
    return [n.target for n in fast.graph_module.graph.nodes if n.op == "call_function"]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("spec, config, op", [
    ("tiny:llama", swa.SlidingWindow(window=4096), torch.ops.attnopt.sliding_window.default),
    pytest.param("tiny:llama", stm.Streaming(sinks=0, window=4096),
                 torch.ops.attnopt.streaming.default, marks=pytest.mark.slow),
    pytest.param("tiny:llama", btk.BlockTopK(block=8, k=16),
                 torch.ops.attnopt.block_topk.default, marks=pytest.mark.slow),
    ("tiny:bert", swa.SlidingWindow(window=4096), torch.ops.attnopt.sliding_window.default),
    pytest.param("tiny:bert-sdpa", btk.BlockTopK(block=8, k=16),
                 torch.ops.attnopt.block_topk.default, marks=pytest.mark.slow),
], ids=lambda x: x if isinstance(x, str) else None)
def test_a_pattern_that_covers_the_sequence_is_exact_end_to_end(spec, config, op):
    """With a window / k covering every key, the sparse op must reproduce the model exactly
    (padding masks, GQA, causal masks all flow through the blocked kernel)."""
    from attnopt.models import build

    built = build(spec, seq=40)
    fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(variant=config))
    rows = fast.report.rows
    assert [r.outcome for r in rows] == [REWRITTEN] * built.expected_sites, fast.report.table()
    assert all(r.variant == config.describe() for r in rows)
    assert all(r.error is not None and r.error.rel < 1e-5 for r in rows), fast.report.table()
    assert _targets(fast).count(op) == len(rows)
    for name, err in fast.report.end_to_end.items():
        assert err.rel < 1e-5, (name, fast.report.table())


@pytest.mark.parametrize("config, op", [
    (swa.SlidingWindow(window=6), torch.ops.attnopt.sliding_window.default),
    (stm.Streaming(sinks=2, window=6), torch.ops.attnopt.streaming.default),
    (btk.BlockTopK(block=8, k=1), torch.ops.attnopt.block_topk.default),
], ids=lambda x: x.name if isinstance(x, Variant) else None)
def test_sparse_rewrite_of_a_gqa_decoder_reports_density_and_error(config, op):
    from attnopt.models import build

    built = build("tiny:llama", seq=48)
    fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(variant=config))
    for r in fast.report.rows:
        assert r.outcome == REWRITTEN and r.variant == config.describe()
        assert 0.05 < r.density < 0.7 and r.error is not None
        assert 0 < r.error.rel < 10 and r.error.cosine > 0.5  # an approximation, measured
        assert f"d={r.density:.2f}" in fast.report.table()
    with torch.no_grad():
        out = _logits(fast(**built.inputs))
    assert torch.isfinite(out).all()
    assert _targets(fast).count(op) == len(fast.report.rows)


def _vit(image: int):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, image_size=image, patch_size=8)
    return ViTModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, image, image)}


def test_neighborhood_infers_the_vit_grid_and_is_exact_when_the_kernel_covers_it():
    model, inputs = _vit(40)  # 5 x 5 patches + [CLS]
    fast = attnopt.optimize(model, inputs, attnopt.Config(variant=nbh.Neighborhood2D(kernel=5)))
    (row,) = fast.report.rows
    assert row.outcome == REWRITTEN and row.error.rel < 1e-5, fast.report.table()
    (call,) = [n for n in fast.graph_module.graph.nodes
               if n.target == torch.ops.attnopt.neighborhood2d.default]
    assert call.args[6:8] == (5, 5)
    small = attnopt.optimize(model, inputs, attnopt.Config(variant=nbh.Neighborhood2D(kernel=3)))
    (row,) = small.report.rows
    assert row.outcome == REWRITTEN and row.density == pytest.approx((26 + 25 * 10) / 26**2)
    assert 0 < row.error.rel < 10


def test_refused_sites_stay_exact_fused_with_the_reason():
    from attnopt.models import build

    built = build("tiny:bert")
    for config, reason in [(stm.Streaming(sinks=4, window=8), "bidirectional"),
                           (nbh.Neighborhood2D(kernel=3), "token grid"),
                           (swa.SlidingWindow(window=8, causal=True), "bidirectional")]:
        fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(variant=config))
        for r in fast.report.rows:
            assert r.outcome == FUSED and r.variant == "fused", fast.report.table()
            assert reason in r.note and "fused exactly instead" in r.note
        targets = [t for t in _targets(fast) if str(t).startswith("attnopt.")]
        assert targets == [torch.ops.attnopt.attention.default] * len(fast.report.rows)
        with torch.no_grad():
            ref = built.model(**built.inputs).last_hidden_state
            out = fast(**built.inputs).last_hidden_state
        assert attnopt.verify.compare(ref, out).rel <= 1e-5


def test_a_site_no_variant_can_take_is_left_as_is():
    """Returned attention weights: neither the variant nor the exact fusion may rewrite it."""
    from zoo import ReturnsWeights

    model = ReturnsWeights().eval()
    fast = attnopt.optimize(model, (torch.randn(2, 12, 32),),
                            attnopt.Config(variant=swa.SlidingWindow(window=4)))
    (row,) = fast.report.rows
    assert row.outcome == LEFT_EXACT and "not applied" in row.note and "another use" in row.note
    assert not any(str(t).startswith("attnopt.") for t in _targets(fast))


@pytest.mark.slow
def test_cross_attention_with_other_lengths_is_left_exact_by_windows():
    from attnopt.models import build

    built = build("tiny:whisper", seq=48)
    fast = attnopt.optimize(built.model, built.inputs,
                            attnopt.Config(variant=swa.SlidingWindow(window=8)))
    kinds = {r.site.kind: r for r in fast.report.rows}
    assert kinds["cross"].outcome == FUSED and "Lq=48 != Lk=32" in kinds["cross"].note
    assert kinds["self"].outcome == REWRITTEN


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        swa.SlidingWindow(window=3).window = 4
