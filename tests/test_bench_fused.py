"""Smoke test of benchmarks/bench_fused.py and benchmarks/_common.py at tiny sizes (seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import bench_fused  # noqa: E402


def test_bench_hand_tiny():
    res = bench_fused.bench_hand([64, 128], causal=False, hidden=64, heads=4, opt_len=32,
                                 budget_s=0.0, min_reps=2, max_reps=2, isolate=False,
                                 memory=False,
                                 log=lambda *_: None)
    assert res["optimize"]["all_fused"], res["optimize"]
    assert res["optimize"]["report_summary"]["fused"] == 1
    assert [row["n"] for row in res["rows"]] == [64, 128]
    for row in res["rows"]:
        t = row["time"]
        assert t["rel_error"] <= 1e-4
        for which in ("original", "optimized"):
            assert t[which]["n"] == 2 and len(t[which]["raw_ms"]) == 2
            assert t[which]["median_ms"] > 0
        assert t["speedup_of_medians"] > 0
    assert not [p for p in bench_fused.problems([res]) if "differ" in p or "fused" in p]
    md = bench_fused.markdown([res], _common.machine_info())
    assert "| 64 |" in md and "| 128 |" in md


def test_time_interleaved_alternates_order():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = _common.time_interleaved(fns, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_measure_call_memory_sees_large_allocation():
    n = 4 * 2**20  # 16 MiB of fp32

    def run():
        x = torch.ones(n)
        return x.sum()

    m = _common.measure_call_memory(run, profile=True)
    assert m["largest_alloc_mb"] == pytest.approx(16.0, abs=0.01)
    assert m["alloc_peak_extra_mb"] >= 16.0
    assert m["rss_peak_extra_mb"] >= 0


def test_rel_error():
    a = torch.tensor([1.0, -2.0])
    assert _common.rel_error(a, a.clone()) == 0
    assert _common.rel_error(a, a + torch.tensor([0.0, 0.2])) == pytest.approx(0.1)
    assert _common.rel_error((a,), (a, a)) == float("inf")


SETUP = """
import torch

def setup(n):
    x = torch.ones(n)
    return {"a": lambda: x * 2, "b": lambda: x + x}, {"n": n}
"""


def test_timing_subprocess(tmp_path):
    (tmp_path / "tiny_setup.py").write_text(SETUP)
    res = _common.timing_subprocess(tmp_path / "tiny_setup.py", "setup", {"n": 8}, budget_s=0.0,
                                    min_reps=2, max_reps=2)
    assert "error" not in res, res
    assert res["info"] == {"n": 8}
    assert res["rel_error"] == {"a": 0.0, "b": 0.0}
    assert res["times"]["b"]["n"] == 2 and set(res["ratios"]) == {"b"}
    assert res["allocator_env"] == _common.TUNED_ALLOCATOR_ENV
