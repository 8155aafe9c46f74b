"""GroupKV (MHA → GQA / MQA): pooling vs a hand-written reference, the closed-form fit, the rewrite
of a tiny BERT (4 heads), refusals, strict mode, and ONNX parity on both targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import rel_err

import attnopt
import attnopt.variants.group_kv as gkv
from attnopt.errors import ConfigError, VariantNotApplicableError
from attnopt.models import tiny
from attnopt.report import REWRITTEN
from attnopt.variants.fused import reference_attention

TOL = 1e-5


def test_pool_heads_is_the_mean_of_each_group():
    k = torch.randn(2, 6, 5, 3)
    pooled = gkv.pool_heads(k, 2)
    want = torch.stack([(k[:, 0] + k[:, 1] + k[:, 2]) / 3, (k[:, 3] + k[:, 4] + k[:, 5]) / 3], 1)
    assert torch.allclose(pooled, want, atol=1e-6)
    assert torch.allclose(gkv.pool_heads(k, 1)[:, 0], k.mean(1), atol=1e-6)


@pytest.mark.parametrize("heads,hkv,groups", [(4, 4, 2), (8, 4, 1), (6, 6, 3)],
                         ids=["H4-KV4-G2", "H8-KV4-G1", "H6-KV6-G3"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_op_equals_reference(heads, hkv, groups, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 19, 8, generator=g)
    k, v = torch.randn(2, hkv, 19, 8, generator=g), torch.randn(2, hkv, 19, 8, generator=g)
    keep = torch.ones(2, 1, 1, 19, dtype=torch.bool)
    keep[1, ..., -4:] = False
    wq = torch.randn(heads, 8, 8, generator=g)
    out = gkv.group_kv(q, k, v, keep, wq, None, None, groups, causal, 0.4)
    ref = gkv.reference_group_kv(q, k, v, keep, wq, None, None, groups, causal, 0.4)
    assert out.shape == (2, heads, 19, 8) and out.is_contiguous()
    assert rel_err(ref, out) < TOL
    # without maps: exactly GQA attention on the mean-pooled heads
    plain = gkv.group_kv(q, k, v, keep, None, None, None, groups, causal, 0.4)
    pooled = [gkv.pool_heads(x, groups) for x in (k, v)]
    assert rel_err(reference_attention(q, *pooled, keep, causal, 0.4), plain) < TOL


def test_fit_recovers_heads_that_are_linear_images_of_each_other():
    # kv heads 1 and 2 are invertible linear images of head 0: the pooled head determines them,
    # so the key and output maps make grouped attention exact (up to the ridge).
    g = torch.Generator().manual_seed(1)
    d = 6
    r = [torch.eye(d)] + [torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) for _ in range(2)]
    samples = []
    for _ in range(3):
        k0, v0 = torch.randn(2, 1, 40, d, generator=g), torch.randn(2, 1, 40, d, generator=g)
        k = torch.cat([k0 @ m for m in r], 1)
        v = torch.cat([v0 @ m.T for m in r], 1)
        q = torch.randn(2, 3, 40, d, generator=g)
        out = torch.ops.attnopt.attention(q, k, v, None, False, 0.5)
        samples.append({"q": q, "k": k, "v": v, "mask": None, "causal": False, "scale": 0.5,
                        "out": out})
    maps = gkv.fit_group_maps(samples, 1)
    assert maps.kind == "key + output maps"
    assert maps.err_mean > 1e-2 and maps.err_fit < 1e-6


def test_config_validation_and_cli():
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ConfigError):
            attnopt.GroupKV(groups=bad)
    from attnopt.cli import parse_variant

    assert parse_variant("group_kv:groups=2") == attnopt.GroupKV(groups=2)
    assert attnopt.Variant.from_dict(attnopt.GroupKV(groups=3).to_dict()) == \
        attnopt.GroupKV(groups=3)


@pytest.fixture(scope="module")
def bert():
    return tiny("bert", batch=2, seq=16)


def _calibration(built, n=4):
    g = torch.Generator().manual_seed(7)
    vocab = built.model.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, built.inputs["input_ids"].shape, generator=g)
        out.append({**built.inputs, "input_ids": ids})
    return out


def test_rewrite_reports_kv_heads_and_error(bert):
    fast = attnopt.optimize(bert.model, bert.inputs,
                            attnopt.Config(variant=attnopt.GroupKV(groups=2)))
    assert fast.report.rows
    for r in fast.report.rows:
        assert r.outcome == REWRITTEN and r.variant == "GroupKV(groups=2)"
        assert r.note.startswith("kv heads 4 -> 2; mean pooling (no calibration)")
        assert r.density == 1.0
        assert 0 < r.error.rel < 10 and torch.isfinite(torch.tensor(r.error.rel))
    calls = [n for n in fast.graph_module.graph.nodes
             if n.target == torch.ops.attnopt.group_kv.default]
    assert len(calls) == len(fast.report.rows)
    assert all(c.args[7] == 2 and c.args[4] is None for c in calls)
    with torch.no_grad():
        assert torch.isfinite(fast(**bert.inputs).last_hidden_state).all()


def test_calibration_lowers_the_error(bert):
    def errors(cfg):
        fast = attnopt.optimize(bert.model, bert.inputs, cfg)
        return fast, [r.error.rel for r in fast.report.rows]

    _, plain = errors(attnopt.Config(variant=attnopt.GroupKV(groups=1)))
    fast, fitted = errors(attnopt.Config(variant=attnopt.GroupKV(groups=1),
                                         calibration=_calibration(bert)))
    assert all(f <= p for f, p in zip(fitted, plain)), (fitted, plain)
    for r in fast.report.rows:
        assert r.note.startswith("kv heads 4 -> 1; ") and "fitted" in r.note


@pytest.mark.parametrize("groups,why", [(3, "does not divide"), (4, "not fewer")])
def test_refusals_leave_sites_exact(bert, groups, why):
    fast = attnopt.optimize(bert.model, bert.inputs,
                            attnopt.Config(variant=attnopt.GroupKV(groups=groups)))
    assert fast.report.count("fused") == len(fast.report.rows) > 0
    assert all(why in r.note for r in fast.report.rows)
    with pytest.raises(VariantNotApplicableError, match=why):
        attnopt.optimize(bert.model, bert.inputs,
                         attnopt.Config(variant=attnopt.GroupKV(groups=groups), strict=True))


def test_refuses_heads_folded_into_the_batch(bert):
    site = attnopt.find_attention(bert.model, bert.inputs)[0]
    assert attnopt.GroupKV(groups=2).can_apply(site) is None
    folded = dataclasses.replace(site, heads=None, kv_heads=None)
    assert "folded into the batch" in attnopt.GroupKV(groups=2).can_apply(folded)
    with pytest.raises(VariantNotApplicableError, match="folded"):
        attnopt.GroupKV(groups=2).can_apply(folded, raise_error=True)


@pytest.mark.parametrize("target,op", [("onnx", "Attention"),
                                       ("onnxruntime", "MultiHeadAttention")])
def test_onnx_export_parity(bert, tmp_path, target, op):
    pytest.importorskip("onnxruntime")
    fast = attnopt.optimize(bert.model, bert.inputs,
                            attnopt.Config(variant=attnopt.GroupKV(groups=1),
                                           calibration=_calibration(bert, 2)))
    res = attnopt.export_onnx(fast, bert.inputs, tmp_path / "m.onnx", target=target)
    assert [s.attention_op for s in res.report.sites] == [op] * len(fast.report.rows)
    assert all("ReduceMean" in s.ops for s in res.report.sites)
    assert res.report.parity and all(e.rel < 1e-4 for e in res.report.parity.values())
