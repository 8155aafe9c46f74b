"""The example scripts still run against the current API (they are what users copy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimize_and_export_example_writes_a_valid_fused_model(tmp_path, capsys):
    _load("optimize_and_export").main(tmp_path)
    model = onnx.load(str(tmp_path / "bert.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == 4 and "Softmax" not in ops
    assert "4 attention sites: 4 fused" in capsys.readouterr().out
