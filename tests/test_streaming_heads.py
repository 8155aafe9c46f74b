"""StreamingHeads (DuoAttention): the op vs its dense reference, the proxy calibration, the
rewrite of a tiny GQA decoder, and ONNX parity on both targets."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
import attnopt.variants.streaming_heads as sh
from attnopt.errors import ConfigError
from attnopt.export._registry import translation_table
from attnopt.report import REWRITTEN
from attnopt.variants import _sparse

TOL = 1e-5


def _mask(kind, b, h, lk, gen):
    if kind is None:
        return None
    keep = torch.rand(b, h if kind.startswith("head") else 1, 1, lk, generator=gen) > 0.25
    keep[..., 0] = True  # key 0 is visible to every causal row
    if kind.endswith("bool"):
        return keep
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([(2, 2), (4, 2), (6, 3), (4, 1)]), b=st.integers(1, 2),
       n=st.integers(1, 200), sinks=st.integers(0, 9), window=st.integers(1, 70),
       mask=st.sampled_from([None, "key-bool", "key-float", "head-key-bool"]),
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_op_equals_dense_reference(heads, b, n, sinks, window, mask, small, seed):
    gen = torch.Generator().manual_seed(seed)
    h, hkv = heads
    q, k, v = (torch.randn(b, x, n, 8, generator=gen) for x in (h, hkv, hkv))
    full = torch.rand(hkv, generator=gen) > 0.5
    m = _mask(mask, b, h, n, gen)
    old = _sparse.CHUNK_BYTES
    _sparse.CHUNK_BYTES = 4096 if small else old
    try:
        out = sh.streaming_heads(q, k, v, m, full, int(full.sum()), sinks, window, 0.3)
    finally:
        _sparse.CHUNK_BYTES = old
    ref = sh.reference_streaming_heads(q, k, v, m, full, sinks, window, 0.3)
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(ref, out) < TOL


def test_op_rejects_a_wrong_head_count():
    q, k = torch.randn(1, 4, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="n_full"):
        sh.streaming_heads(q, k, k, None, torch.tensor([True, False]), 2, 1, 2, 0.5)


@pytest.mark.parametrize("kw", [{"full_fraction": 1.5}, {"full_fraction": True},
                                {"sinks": -1}, {"window": 0}, {"scope": "layer"},
                                {"ranking": "gates"}])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        attnopt.StreamingHeads(**kw)


def test_proxy_ranks_a_long_range_head_first():
    # kv head 1 looks at key 20 from everywhere (retrieval), kv head 0 at its own position.
    n, d = 96, 8
    k = torch.zeros(1, 2, n, d)
    q = torch.zeros(1, 4, n, d)
    k[0, :, :, 0] = torch.arange(n).float() / n    # position code
    k[0, 1, 20, 1] = 1.0
    q[0, 2:, :, 1] = 30.0                           # heads 2, 3 (kv 1) query key 20
    q[0, :2, :, 0] = 40.0                           # heads 0, 1 (kv 0) prefer the latest key
    mass = sh.outside_mass(q, k, None, 1.0, sinks=2, window=8)
    assert mass[2:].min() > 0.5 > 0.1 > mass[:2].max()
    assert sh.choose_full(mass.reshape(2, 2).mean(1), 0.25) == (False, True)
    assert sh.choose_full(torch.tensor([0.1, 0.3, 0.2]), 0.0) == (False, False, False)
    assert sh.choose_full(torch.tensor([0.1, 0.3, 0.2, 0.0]), 0.5) == (False, True, True, False)


def test_output_ranking_keeps_the_head_streaming_gets_wrong():
    # same heads as above, with values: kv head 1 reads a far key whose value differs from the
    # rest, so streaming changes its output; kv head 0 reads its recent keys, which streaming keeps
    n, d = 96, 8
    k = torch.zeros(1, 2, n, d)
    q = torch.zeros(1, 4, n, d)
    k[0, :, :, 0] = torch.arange(n).float() / n
    k[0, 1, 20, 1] = 1.0
    q[0, 2:, :, 1] = 30.0
    q[0, :2, :, 0] = 40.0
    v = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(0))
    out = torch.ops.attnopt.attention(q, k, v, None, True, 1.0)
    err, norm = sh.streaming_error(q, k, v, None, out, 1.0, sinks=2, window=8)
    rel = err / norm
    assert rel[2:].min() > 10 * rel[:2].max()
    smp = [{"q": q, "k": k, "v": v, "mask": None, "causal": True, "scale": 1.0, "out": out}]
    cfg = attnopt.StreamingHeads(sinks=2, window=8, full_fraction=0.5, ranking="output")
    plan = sh.StreamingHeadsImpl().fit(cfg, SimpleNamespace(kv_heads=2), smp)  # fit reads kv_heads
    assert plan.full == (False, True) and plan.ranking == "output"
    assert "relative error of streaming" in plan.describe(2)


def _fast(seq=40, **kw):
    from attnopt.models import build

    built = build("tiny:llama", seq=seq)
    kw = {"full_fraction": 0.5, **kw}
    cfg = attnopt.Config(variant=attnopt.StreamingHeads(sinks=2, window=8, **kw))
    return attnopt.optimize(built.model, built.inputs, cfg)


def test_rewrite_reports_density_and_full_heads():
    fast = _fast()
    assert fast.report.rows
    for r in fast.report.rows:
        assert r.outcome == REWRITTEN and 0 < r.error.rel < 10
        # one of two kv heads full: density = 1/2 + 1/2 · streaming density
        stream = sh.streaming_pairs(40, 40, 2, 8) / _sparse.exact_pairs(40, 40, True)
        assert r.density == pytest.approx(0.5 + 0.5 * stream)
        assert "full heads [" in r.note and "(kv [" in r.note
    calls = [n for n in fast.graph_module.graph.nodes
             if n.target == torch.ops.attnopt.streaming_heads.default]
    assert len(calls) == len(fast.report.rows) and all(c.args[5] == 1 for c in calls)


def test_model_scope_ranks_heads_across_sites():
    impl = sh.StreamingHeadsImpl()
    states = {0: sh.HeadPlan(full=(True, False), mass=(0.02, 0.01)),
              1: sh.HeadPlan(full=(True, False), mass=(0.40, 0.30)),
              2: sh.HeadPlan(full=(True, False), mass=(0.05, 0.35))}
    per_model = attnopt.StreamingHeads(full_fraction=0.5, scope="model")
    got = impl.fit_jointly(per_model, states)
    # the 3 of 6 kv heads with the most mass, wherever they are: site 0 gets none
    assert [got[i].full for i in range(3)] == [(False, False), (True, True), (False, True)]
    assert got[1].mass == states[1].mass
    assert impl.fit_jointly(attnopt.StreamingHeads(full_fraction=0.5), states) == states


def test_model_scope_end_to_end_keeps_the_global_budget():
    from attnopt.models import build

    built = build("tiny:llama", seq=40)
    cfg = attnopt.Config(variant=attnopt.StreamingHeads(sinks=2, window=8, full_fraction=0.25,
                                                        scope="model"))
    fast = attnopt.optimize(built.model, built.inputs, cfg)
    calls = [n for n in fast.graph_module.graph.nodes
             if n.target == torch.ops.attnopt.streaming_heads.default]
    kv_heads = sum(r.site.kv_heads for r in fast.report.rows)
    assert len(calls) == len(fast.report.rows) >= 2
    # round(0.25 · 4 kv heads) = 1 full kv head in the whole model
    assert sum(c.args[5] for c in calls) == round(0.25 * kv_heads) == 1
    assert all(r.outcome == REWRITTEN and r.error.rel < 10 for r in fast.report.rows)


@pytest.mark.parametrize("target,scope", [("onnx", "site"), ("onnxruntime", "site"),
                                          ("onnxruntime", "model")])
def test_onnx_export_matches_torch(target, scope):
    """``scope="model"`` with one full kv head in the model: the other site has none."""
    ort = pytest.importorskip("onnxruntime")
    fast = _fast(scope=scope, full_fraction=0.5 if scope == "site" else 0.25)
    if scope == "model":
        n_full = [n.args[5] for n in fast.graph_module.graph.nodes
                  if n.target == torch.ops.attnopt.streaming_heads.default]
        assert sorted(n_full) == [0, 1]
    program = torch.onnx.export(fast.exported_program(), dynamo=True, opset_version=23,
                                optimize=False, verbose=False,
                                custom_translation_table=translation_table(target))
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert "TopK" in ops and ("Attention" if target == "onnx" else "MultiHeadAttention") in ops
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for n, seed in ((40, 0), (77, 1)):
        gen = torch.Generator().manual_seed(seed)
        feeds = {"input_ids": torch.randint(3, 120, (2, n), generator=gen),
                 "attention_mask": torch.ones(2, n, dtype=torch.long)}
        feeds["attention_mask"][-1, n - 4:] = 0
        with torch.no_grad():
            want = fast(**feeds).logits.numpy()
        got = sess.run(None, {k: feeds[k].numpy() for k in names})[0]
        assert float(np.abs(got - want).max() / np.abs(want).max()) < TOL


def test_cli_parses_the_variant():
    from attnopt.cli import parse_variant

    assert parse_variant("streaming_heads:sinks=4,window=256,full_fraction=0.25") == \
        attnopt.StreamingHeads(sinks=4, window=256, full_fraction=0.25)
