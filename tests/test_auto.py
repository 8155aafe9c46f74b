"""Auto: a per-site plan searched within a model-level accuracy budget (attnopt.auto)."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.models import tiny
from attnopt.variants import Fused, Streaming


@pytest.mark.parametrize("kw", [{}, {"max_ppl_increase": 0.05, "min_cosine": 0.9},
                                {"max_ppl_increase": -1.0}, {"min_cosine": 2.0},
                                {"min_cosine": 0.9, "window_fractions": (1.5,)}])
def test_budget_validation(kw):
    with pytest.raises(attnopt.ConfigError):
        attnopt.Auto(**kw)


def _llama(length: int):
    built = tiny("llama", batch=1, seq=length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (1, length), generator=g)
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    return built, calibration


def test_an_unreachable_budget_leaves_every_site_exact_and_says_so(tmp_path):
    built, calibration = _llama(256)
    fast = attnopt.optimize(built.model, built.inputs,
                            attnopt.Auto(min_cosine=1.0, calibration=calibration))
    auto = fast.report.auto
    assert set(auto.plan.values()) == {"exact"} and auto.cost == 1.0
    assert all(isinstance(v, Fused) for v in fast.config.overrides.values())
    assert any("left exact" in n for n in auto.notes), auto.notes
    assert [p for p in auto.points if p.chosen] and auto.value == pytest.approx(1.0, abs=1e-5)
    # the search travels with the model (its calibration batches do not)
    loaded = attnopt.load(attnopt.save(fast, tmp_path / "auto.pt2"))
    assert loaded.report.auto.table() == auto.table()
    assert loaded.report.auto.budget.calibration is None


def test_the_search_keeps_the_budget_and_the_plan_reapplies():
    """At 4096 tokens the streaming kernel is faster than exact SDPA (measured by the cost
    model itself): the search must end within the budget, account for every site, and its plan
    must re-apply without a search.
    """
    built, calibration = _llama(4096)
    budget = attnopt.Auto(min_cosine=0.9, calibration=calibration)
    fast = attnopt.optimize(built.model, built.inputs, budget)
    auto = fast.report.auto
    assert auto.value >= 0.9 and auto.points[-1].chosen and auto.points[-1].within
    assert set(auto.plan) == {s.location for s in fast.sites}
    approximate = [v for v in fast.config.overrides.values() if isinstance(v, Streaming)]
    assert (auto.cost < 1.0) == bool(approximate), (auto.cost, auto.table())
    for label, ratio in auto.costs.items():   # only kernels measured faster may be chosen
        if any(label.startswith(v.describe()) for v in approximate):
            assert ratio < 1.0, (label, ratio)
    again = attnopt.optimize(built.model, built.inputs, fast.config)
    with torch.no_grad():
        a = fast(**calibration[0]).logits
        b = again(**calibration[0]).logits
    assert torch.equal(a, b)
    assert "attention cost" in auto.table() and fast.report.to_dict()["auto"]["plan"]


def test_perplexity_budget_needs_logits():
    built = tiny("bert", batch=1, seq=16)
    with pytest.raises(attnopt.ConfigError, match="logits"):
        attnopt.optimize(built.model, built.inputs, attnopt.Auto(max_ppl_increase=0.05))
