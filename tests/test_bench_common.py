"""The one timing core of the benchmarks (``benchmarks/_common.time_rounds``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402


def test_a_slow_first_call_is_the_warm_up_and_still_gets_timed_rounds():
    calls = []
    res = _common.time_rounds({"f": lambda: calls.append(1)}, min_reps=2, max_reps=2,
                              long_round_s=0.0)
    assert res["warmup_rounds"] == 0 and res["rounds"] == 2 and len(calls) == 3
    res = _common.time_rounds({"f": lambda: calls.append(1)}, min_reps=2, max_reps=2)
    assert res["warmup_rounds"] == 1 and len(res["cpu_s"]["f"]) == 2


def test_bench_linear_times_the_dense_baseline_beyond_4k_with_warm_up_and_reps(monkeypatch):
    """It timed dense SDPA once, cold, beyond 4k tokens; the speedups above 4k rested on it."""
    import importlib

    for k, v in {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "100000000000",
                 "MALLOC_TOP_PAD_": "1073741824"}.items():
        monkeypatch.setenv(k, v)  # the script re-executes itself unless these are set
    bench_linear = importlib.import_module("bench_linear")
    monkeypatch.setattr(bench_linear, "HEADS", 1)  # small: the timing logic is under test
    calls = []
    sdpa = bench_linear.F.scaled_dot_product_attention
    monkeypatch.setattr(bench_linear.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    rows: list = []
    bench_linear.bench_torch([4160], ["relu"], 2, "skip", 64, rows, lambda: None)
    dense = [r for r in rows if r["op"] == "dense SDPA"]
    assert len(dense) == 2 and all(r["reps"] == 2 for r in dense)
    assert len(calls) == 2 * (1 + 1 + 2)  # causal and not: first call, warm-up, 2 timed
    assert all(r["speedup_vs_dense"] > 0 for r in rows if r["op"] == "linear relu")
