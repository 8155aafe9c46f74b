"""The matcher on every attention spelling of tests/zoo.py, and softmaxes that are not attention."""

from __future__ import annotations

import pytest
import torch
from zoo import CASES, NEGATIVES, Case

import attnopt
from attnopt.report import FUSED, LEFT_EXACT


def _run(case: Case):
    model = case.build().eval()
    dtype = case.extra.get("dtype")
    if dtype is not None:
        model = model.to(dtype)
    inputs = case.inputs()
    return model, inputs, attnopt.optimize(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_spelling_is_found_fused_and_exact(case: Case):
    model, inputs, fast = _run(case)
    report = fast.report
    assert len(report.rows) == case.sites, report.table()
    expected_fused = case.sites if case.fused is None else case.fused
    assert report.count(FUSED) == expected_fused, report.table()
    with torch.no_grad():
        ref = model(*inputs)
        out = fast(*inputs)
    resized = [e for k, e in report.end_to_end.items() if k.startswith("resized")]
    if case.extra.get("resized"):  # verified on a second input size while optimizing
        assert len(resized) == 1 and resized[0].rel <= 1e-5, report.table()
    err = attnopt.verify.compare(ref, out)
    tol = 3e-2 if case.extra.get("dtype") == torch.bfloat16 else 1e-5
    assert err.rel <= tol, f"{case.name}: rel err {err.rel}"
    site = report.rows[0].site
    if case.causal is not None:
        assert site.causal == case.causal, report.table()
    if case.kv_heads is not None:
        assert site.kv_heads == case.kv_heads and site.heads == 4, report.table()
    if case.kind is not None:
        assert site.kind == case.kind
    if case.mask is not None:
        assert site.mask == case.mask, report.table()
    # A fused site leaves no softmax behind (no N×N scores at run time).
    targets = [n.target for n in fast.graph_module.graph.nodes if n.op == "call_function"]
    n_attn = (targets.count(torch.ops.attnopt.attention.default)
              + targets.count(torch.ops.attnopt.softcap_attention.default))
    assert n_attn == fast.report.count(FUSED)
    softmaxes = sum(t in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
                    for t in targets)
    assert softmaxes == fast.report.count(LEFT_EXACT)


@pytest.mark.parametrize("case", NEGATIVES, ids=lambda c: c.name)
def test_softmax_that_is_not_attention_is_never_rewritten(case: Case):
    model, inputs, fast = _run(case)
    assert fast.report.rows == []
    targets = [n.target for n in fast.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnopt.attention.default not in targets
    with torch.no_grad():
        assert torch.equal(model(*inputs), fast(*inputs))


def test_negatives_are_reported_with_a_reason():
    case = next(c for c in NEGATIVES if c.name == "moe_router")
    _, _, fast = _run(case)
    assert fast.report.rejected and fast.report.rejected[0].reason
    assert "not attention" in fast.report.table()


def test_returned_attention_weights_keep_the_site_exact_with_reason():
    case = next(c for c in CASES if c.name == "returns_weights")
    model, inputs, fast = _run(case)
    row = fast.report.rows[0]
    assert row.outcome == LEFT_EXACT and "another use" in row.note
    out, probs = fast(*inputs)
    ref_out, ref_probs = model(*inputs)
    assert torch.allclose(probs, ref_probs) and torch.allclose(out, ref_out)


def test_training_mode_dropout_is_captured_in_eval_mode():
    case = next(c for c in CASES if c.name == "eval_dropout")
    model = case.build().train()
    fast = attnopt.optimize(model, case.inputs())
    assert model.training, "the user's model mode is restored"
    assert fast.report.count(FUSED) == 1
    assert any("training mode" in n for n in fast.report.notes)


def test_causal_site_runs_causal_kernel_without_mask():
    """A recognised causal mask becomes is_causal, not an N×N mask operand."""
    case = next(c for c in CASES if c.name == "causal_tril_buffer")
    _, _, fast = _run(case)
    (call,) = [n for n in fast.graph_module.graph.nodes
               if n.target == torch.ops.attnopt.attention.default]
    q, k, v, mask, is_causal, scale = call.args
    assert mask is None and is_causal is True


def test_sites_report_where_they_are():
    case = next(c for c in CASES if c.name == "transformer_decoder_layer")
    model = case.build().eval()
    sites = attnopt.find_attention(model, case.inputs())
    assert [s.location for s in sites] == ["layer.self_attn", "layer.multihead_attn"]
    assert [s.kind for s in sites] == ["self", "cross"]
    assert all(s.already_fused for s in sites)
