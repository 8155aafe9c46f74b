"""Smoke test of benchmarks/bench_onnx_peers.py on a tiny BERT (exports, timing, table)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import bench_onnx_peers  # noqa: E402

TINY = {"layers": 1, "hidden": 64, "heads": 4, "intermediate": 128, "max_len": 128}


def test_bench_onnx_peers_tiny_bert(tmp_path):
    res = bench_onnx_peers.bench_model(
        "bert", [32], tmp_path, export_len=16, threads=1, budget_s=0.0, min_reps=2,
        max_reps=2, isolate=False, cfg=TINY, log=lambda *_: None)
    ex = res["exports"]
    assert set(ex) == set(bench_onnx_peers.VARIANTS)
    assert all("error" not in i for i in ex.values()), ex
    # (a) keeps attention decomposed; (c) fuses it into one contrib op per layer.
    assert ex["a_dynamo"]["decomposes_attention"]
    assert ex["c_attnopt"]["fused_attention"]
    assert ex["c_attnopt"]["attention_ops"] == {"MultiHeadAttention": 1}
    assert "fused_operator_statistics" in ex["b_torchscript_ort"]
    (row,) = res["rows"]
    t = row["time"]
    assert "error" not in t, t
    assert t["rounds"] == 2 and t["warmup_rounds"] == 1
    for key in ("median_ms", "wall_median_ms", "cpu", "wall", "cpu_over_wall"):
        assert set(t[key]) == set(bench_onnx_peers.VARIANTS), key
    for v in bench_onnx_peers.VARIANTS:
        assert t["median_ms"][v] > 0 and len(t["cpu"][v]["raw_ms"]) == 2
    for v, err in t["rel_error_vs_torch"].items():
        assert err <= 1e-4, (v, err)
    for key in ("b_over_c", "a_over_c", "b_over_c_wall", "a_over_c_wall"):
        assert t[key]["of_medians"] > 0, key
    assert not [p for p in bench_onnx_peers.problems([res]) if "differs" in p or "failed" in p]
    machine = {**_common.machine_info(), "onnxruntime": "x", "ort_threads": 1}
    md = bench_onnx_peers.markdown([res], machine)
    assert "| BERT (BertModel) | 32 | 2 |" in md and "MultiHeadAttention ×1" in md
    assert "## Reading" in md and "Parity" in md


def test_time_rounds_interleaves_and_measures_cpu():
    calls = []

    def busy(name, seconds):
        def f():
            calls.append(name)
            t0 = time.process_time()
            while time.process_time() - t0 < seconds:
                pass
        return f

    def idle():
        calls.append("s")
        time.sleep(0.01)

    res = bench_onnx_peers.time_rounds({"b": busy("b", 0.01), "s": idle}, budget_s=0.0,
                                       min_reps=4, max_reps=4)
    assert res["rounds"] == 4 and res["warmup_rounds"] == 1
    # first call + warm-up, then the order alternates (all permutations of two names)
    assert calls == ["b", "s", "s", "b", "b", "s", "s", "b", "b", "s", "s", "b"]
    assert res["cpu"]["b"]["median_ms"] >= 9.0
    assert res["cpu"]["s"]["median_ms"] < 5.0 <= res["wall"]["s"]["median_ms"]
    assert res["cpu_over_wall"]["s"] < 0.5


def test_summarize_profile(tmp_path):
    import json

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
        {"cat": "Node", "name": "mm_kernel_time", "ts": 1, "dur": 5, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 10},
        {"cat": "Node", "name": "mm_kernel_time", "ts": 101, "dur": 6,
         "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "sm_kernel_time", "ts": 105, "dur": 2,
         "args": {"op_name": "Softmax"}},
    ]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(events))
    p = bench_onnx_peers.summarize_profile(str(f), runs=1)  # the first run is dropped
    assert p["by_op_type"]["MatMul"]["ms_per_run"] == pytest.approx(0.006)
    assert p["by_op_type"]["Softmax"]["share"] == pytest.approx(0.25)
    assert p["top_nodes"][0]["node"] == "mm"
