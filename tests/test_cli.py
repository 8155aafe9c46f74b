"""The command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def _attnopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnopt.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_inspect_lists_sites(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("inspect", "tiny:llama", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "model.layers.1.self_attn" in res.stdout
    assert "found 2 (as expected)" in res.stdout
    data = json.loads(out.read_text())
    assert [s["kv_heads"] for s in data["sites"]] == [2, 2]


def test_optimize_prints_report_and_verifies(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("optimize", "tiny:whisper", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "6 attention sites: 6 fused" in res.stdout
    data = json.loads(out.read_text())
    assert len(data["end_to_end"]) == 2
    assert all(e["rel"] < 1e-4 for e in data["end_to_end"].values())
    assert "capture" in res.stderr  # progress lines with timings


def test_bad_spec_is_a_clear_error():
    res = _attnopt("inspect", "tiny:nonsense")
    assert res.returncode == 2
    assert "unknown tiny model" in res.stderr


def test_optimize_with_a_variant_and_an_exact_layer(tmp_path):
    out = tmp_path / "r.json"
    res = _attnopt("optimize", "tiny:llama", "--variant", "sliding_window:window=8",
                   "--exact", "*layers.0.*", "--json", str(out))
    assert res.returncode == 0, res.stderr
    sites = json.loads(out.read_text())["sites"]
    assert [s["variant"] for s in sites] == ["fused", "SlidingWindow(window=8)"]
    assert sites[0]["error"]["rel"] < 1e-4
    assert 0 < sites[1]["density"] < 1 and sites[1]["error"]["rel"] > 1e-4  # approximate, measured


def test_bad_variant_is_a_clear_error():
    res = _attnopt("optimize", "tiny:llama", "--variant", "sliding_window:windw=8")
    assert res.returncode == 2
    assert "unexpected keyword argument 'windw'" in res.stderr
