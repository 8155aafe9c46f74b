"""benchmarks/bench_gpu.py on CPU at tiny sizes (``--cpu-smoke``): every section's code runs,
the results files are written, a failing section does not stop the others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_cpu_smoke_writes_every_section(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(bench_gpu, "linear_section", broken)
    rc = bench_gpu.main([str(tmp_path), "--cpu-smoke", "--skip", "pytest_gpu,cpu_tests"])
    assert rc == 0
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    secs = data["sections"]
    assert secs["pytest_gpu"]["status"].startswith("skipped")
    assert secs["fused"]["status"] == "done"
    fused = secs["fused"]["rows"]
    assert [r["n"] for r in fused] == [256, 512, 1024]
    assert all(r["backend"].startswith("flash") and r["rel_err"] < 1e-5 for r in fused)
    assert secs["fused"]["report"]["fused"] == 1
    sparse = secs["sparse"]["rows"]
    assert len(sparse) == 4 and all(r["variant_ms"] > 0 and 0 < r["density"] < 1
                                    for r in sparse)
    assert secs["linear"]["status"].startswith("failed: RuntimeError: planted failure")
    md = (tmp_path / "gpu_results.md").read_text()
    assert "| 1024 | SlidingWindow(64) |" in md and "Neighborhood2D" in md
