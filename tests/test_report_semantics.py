"""What reports say: tolerances only for exact rewrites, densities, NaN rows, fitting."""

from __future__ import annotations

import math

import torch
from zoo import BoolMaskedFill, E, L, MulScale

import attnopt
from attnopt.report import FUSED, REWRITTEN
from attnopt.verify import compare


def _fully_padded():
    x = torch.randn(2, L, E)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1] = False  # the second sequence is all padding: softmax is 0/0 in the original
    return x, keep


def test_compare_excludes_and_counts_nan_reference_values():
    ref = torch.tensor([[1.0, 2.0], [math.nan, math.nan]])
    err = compare(ref, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert err.rel == 0.0 and err.nan_in_reference == 2
    # NaN where the reference is finite is a real failure
    assert compare(torch.ones(2), torch.tensor([1.0, math.nan])).rel == math.inf


def test_fully_padded_rows_do_not_revert_an_exact_fusion():
    model = BoolMaskedFill().eval()
    x, keep = _fully_padded()
    assert torch.isnan(model(x, keep)).any()
    fast = attnopt.optimize(model, (x, keep))
    row = fast.report.rows[0]
    assert row.outcome == FUSED and row.error.rel < 1e-5
    assert row.error.nan_in_reference == 2 * L * 32 // 2  # batch 1 of [2, H, L, D]
    assert "NaN in the original model" in fast.report.table()
    assert fast.report.to_dict()["sites"][0]["error"]["nan_in_reference"] > 0
    valid = fast(x, keep)[0]
    assert torch.allclose(valid, model(x, keep)[0], atol=1e-5)


def test_approximate_report_shows_density_and_no_tolerance():
    x = torch.randn(2, 12, 32)
    fast = attnopt.optimize(MulScale().eval(), (x,),
                            attnopt.Config(variant=attnopt.Linear(feature_map="performer")))
    row = fast.report.rows[0]
    assert row.outcome == REWRITTEN and row.density is not None
    table = fast.report.table()
    assert f"d={row.density:.2f}" in table
    assert "tolerance" not in table and "approximate: measured, not bounded" in table
    exact = attnopt.optimize(MulScale().eval(), (x,))
    assert "tolerance 1e-04" in exact.report.table()


def _fitted_buffers(fast) -> list[str]:
    return [n for n, _ in fast.graph_module.named_buffers() if n.endswith("_wq")]


def test_fixed_feature_maps_fit_only_with_calibration():
    x = torch.randn(2, 12, 32)
    for fmap in ("elu", "relu", "performer", "taylor"):
        cfg = attnopt.Config(variant=attnopt.Linear(feature_map=fmap, steps=3))
        fast = attnopt.optimize(MulScale().eval(), (x,), cfg)
        assert _fitted_buffers(fast) == [], fmap
        assert not any("calibration" in n for n in fast.report.notes), fmap
    cfg = attnopt.Config(variant=attnopt.Linear(feature_map="elu", steps=3),
                         calibration=[(torch.randn(2, 12, 32),)])
    assert len(_fitted_buffers(attnopt.optimize(MulScale().eval(), (x,), cfg))) == 1
    learned = attnopt.Config(variant=attnopt.Linear(feature_map="learned", steps=3))
    fast = attnopt.optimize(MulScale().eval(), (x,), learned)
    assert len(_fitted_buffers(fast)) == 1
    assert any("no calibration data" in n for n in fast.report.notes)
