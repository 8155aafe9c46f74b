"""PruneHeads: the op vs its dense reference (hypothesis), the importance proxy and mean ablation,
the model-wide budget, the rewrite of a tiny BERT (narrowed projections) and Llama (GQA, gathered
heads), refusals, and ONNX parity on both targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
import attnopt.variants.prune_heads as ph
from attnopt.errors import ConfigError, VariantNotApplicableError
from attnopt.models import tiny
from attnopt.report import REWRITTEN

TOL = 1e-5


def _pruned_call(q, k, v, mask, flags, fill, causal, scale):
    """The op on the kept heads, gathered the way the rewrite gathers them."""
    keep = flags.nonzero().flatten()
    kv = keep // (q.shape[1] // k.shape[1])
    m = mask if mask is None or mask.shape[1] == 1 else mask.index_select(1, keep)
    return torch.ops.attnopt.prune_heads(q.index_select(1, keep), k.index_select(1, kv),
                                         v.index_select(1, kv), m, keep, fill, causal, scale)


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([(2, 1), (4, 4), (4, 2), (6, 3)]), lq=st.integers(1, 13),
       lk=st.integers(1, 13), causal=st.booleans(), mask=st.sampled_from(["none", "keys", "heads"]),
       seed=st.integers(0, 1000))
def test_op_equals_reference(heads, lq, lk, causal, mask, seed):
    h, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, lq, 8, generator=g)
    k, v = torch.randn(2, hkv, lk, 8, generator=g), torch.randn(2, hkv, lk, 8, generator=g)
    flags = torch.rand(h, generator=g) < 0.6
    flags[int(torch.randint(h, (1,), generator=g))] = True           # at least one head kept
    fill = torch.randn(h, 8, generator=g)
    m = None
    if mask == "keys":
        m = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        m[1, ..., lk // 2:] = False
        m[..., 0] = True
    elif mask == "heads":  # an additive per-head bias
        m = torch.randn(2, h, lq, lk, generator=g)
    out = _pruned_call(q, k, v, m, flags, fill, causal and lq <= lk, 0.3)
    ref = ph.reference_prune_heads(q, k, v, m, flags, fill, causal and lq <= lk, 0.3)
    assert out.shape == (2, h, lq, 8) and out.is_contiguous()
    assert rel_err(ref, out) < TOL
    dropped = (~flags).nonzero().flatten()
    assert torch.equal(out[:, dropped], fill[dropped][None, :, None, :].expand(2, -1, lq, -1))


def _samples(outs):
    return [{"q": o, "k": o, "v": o, "mask": None, "causal": False, "scale": 1.0, "out": o}
            for o in outs]


def test_importance_is_the_variance_and_mean_ablation_beats_zeroing():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 4, 10, 5, generator=g) for _ in range(3)]
    for o in outs:
        o[:, 1] = 3.0 + 0.01 * o[:, 1]      # head 1: nearly constant, far from 0
        o[:, 3] *= 4.0                      # head 3: the most varied
    importance, energy, fill = ph.head_importance(_samples(outs))
    assert importance.argmin() == 1 and importance.argmax() == 3
    allo = torch.cat(outs, 0)
    want = ((allo - allo.mean((0, 2), keepdim=True)) ** 2).sum(-1).mean((0, 2)).double()
    assert torch.allclose(importance, want, rtol=1e-6)
    assert energy == pytest.approx(float((allo.double() ** 2).sum(-1).mean((0, 2)).sum()))
    assert torch.allclose(fill, allo.mean((0, 2)), atol=1e-6)
    # dropping head 1 with its mean costs its variance; dropping it with zeros costs far more
    mean_err = ((allo[:, 1] - fill[1][None, None]) ** 2).sum(-1).mean()
    zero_err = (allo[:, 1] ** 2).sum(-1).mean()
    assert mean_err == pytest.approx(float(importance[1]), rel=1e-4)
    assert mean_err < 1e-3 * zero_err
    assert ph.choose_kept(importance, 0.25) == (True, False, True, True)
    assert ph.choose_kept(importance, 0.99) == (False, False, False, True)   # one head kept


def test_padding_rows_do_not_count():
    out = torch.randn(2, 2, 6, 3)
    out[1, :, 4:] = 1e6                    # padding query rows of the second sequence
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    smp = [{"q": out, "k": out, "v": out, "mask": mask, "causal": False, "scale": 1.0,
            "out": out}]
    importance, _, fill = ph.head_importance(smp)
    assert float(importance.max()) < 100 and float(fill.abs().max()) < 100


def _state(importance, energy=1.0):
    n = len(importance)
    return ph.HeadImportance(keep=(True,) * n, importance=tuple(importance), energy=energy,
                             fill=torch.zeros(n, 2))


def test_model_scope_ranks_heads_across_sites_and_keeps_one_per_site():
    impl = ph.PruneHeadsImpl()
    states = {0: _state([0.01, 0.02, 0.03, 0.04]), 1: _state([0.5, 0.6, 0.7, 0.8]),
              2: _state([0.001, 0.002, 0.003, 0.004])}
    out = impl.fit_jointly(attnopt.PruneHeads(fraction=0.5, scope="model"), states)
    dropped = {i: s.keep.count(False) for i, s in out.items()}
    assert sum(dropped.values()) == 6                     # round(0.5 · 12)
    assert dropped[1] == 0                                # the important layer keeps all heads
    assert dropped[2] == 3 and dropped[0] == 3            # one head left in each other site
    # energy normalisation: the same variances in a site with 100x the energy are unimportant
    states = {0: _state([0.1, 0.2], energy=1.0), 1: _state([0.1, 0.2], energy=100.0)}
    out = impl.fit_jointly(attnopt.PruneHeads(fraction=0.25, scope="model"), states)
    assert out[0].keep == (True, True) and out[1].keep == (False, True)
    # scope="site" leaves the per-site choice alone
    assert impl.fit_jointly(attnopt.PruneHeads(fraction=0.5), states) is states


def test_config_validation_and_cli():
    for bad in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ConfigError):
            attnopt.PruneHeads(fraction=bad)
    with pytest.raises(ConfigError, match="scope"):
        attnopt.PruneHeads(scope="layer")
    from attnopt.cli import parse_variant

    assert parse_variant("prune_heads:fraction=0.5,scope=model") == \
        attnopt.PruneHeads(fraction=0.5, scope="model")


@pytest.fixture(scope="module")
def bert():
    return tiny("bert", batch=2, seq=16)


@pytest.fixture(scope="module")
def pruned_bert(bert):
    return attnopt.optimize(bert.model, bert.inputs,
                            attnopt.Config(variant=attnopt.PruneHeads(fraction=0.5)))


def _nodes(fast, target):
    return [n for n in fast.graph_module.graph.nodes if n.target == target]


def test_bert_rewrite_narrows_the_projections(bert, pruned_bert):
    fast = pruned_bert
    heads, d = bert.model.config.num_attention_heads, bert.model.config.hidden_size
    head_dim = d // heads
    assert fast.report.rows
    for r in fast.report.rows:
        assert r.outcome == REWRITTEN and r.variant == "PruneHeads(fraction=0.5)"
        assert r.density == 0.5
        assert r.note.startswith("dropped heads [") and f"of {heads}" in r.note
    calls = _nodes(fast, torch.ops.attnopt.prune_heads.default)
    assert len(calls) == len(fast.report.rows)
    assert not _nodes(fast, torch.ops.aten.index_select.default)     # no gather: narrowed
    gm = fast.graph_module
    widths = sorted({tuple(getattr(gm, n.args[1].target).shape)
                     for n in _nodes(fast, torch.ops.aten.linear.default)
                     if n.args[1].target.startswith("attnopt_prune_")})
    assert widths == [(heads // 2 * head_dim, d)]
    with torch.no_grad():
        got = fast(**bert.inputs).last_hidden_state
        ref = bert.model(**bert.inputs).last_hidden_state
    assert torch.isfinite(got).all() and 0 < rel_err(ref, got) < 0.5


def test_dropping_nothing_is_exact(bert):
    fast = attnopt.optimize(bert.model, bert.inputs,
                            attnopt.Config(variant=attnopt.PruneHeads(fraction=0.0)))
    assert all(r.error.rel < 1e-5 for r in fast.report.rows)


def test_llama_gqa_gathers_heads_behind_rotary_embeddings():
    llama = tiny("llama", batch=2, seq=12)
    fast = attnopt.optimize(llama.model, llama.inputs,
                            attnopt.Config(variant=attnopt.PruneHeads(fraction=0.5)))
    assert fast.report.count("rewritten") == len(fast.report.rows) > 0
    assert _nodes(fast, torch.ops.aten.index_select.default)        # q behind RoPE: gathered
    with torch.no_grad():
        assert torch.isfinite(fast(**llama.inputs).logits).all()


def test_refuses_heads_folded_into_the_batch(bert):
    site = attnopt.find_attention(bert.model, bert.inputs)[0]
    assert attnopt.PruneHeads().can_apply(site) is None
    folded = dataclasses.replace(site, heads=None, kv_heads=None)
    with pytest.raises(VariantNotApplicableError, match="folded"):
        attnopt.PruneHeads().can_apply(folded, raise_error=True)


@pytest.mark.parametrize("target,op", [("onnx", "Attention"),
                                       ("onnxruntime", "MultiHeadAttention")])
def test_onnx_export_parity(bert, pruned_bert, tmp_path, target, op):
    pytest.importorskip("onnxruntime")
    res = attnopt.export_onnx(pruned_bert, bert.inputs, tmp_path / "m.onnx", target=target)
    assert [s.attention_op for s in res.report.sites] == [op] * len(pruned_bert.report.rows)
    assert all("ScatterElements" in s.ops for s in res.report.sites)
    assert res.report.parity and all(e.rel < 1e-4 for e in res.report.parity.values())
