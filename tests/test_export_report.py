"""Export details: untouched sites stay untouched, rows paired by site, dynamic dim names."""

from __future__ import annotations

import re

import onnx
import torch
import torch.nn as nn

import attnopt
from attnopt.export._dim_names import axis_name
from attnopt.models import tiny


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_untouched_site_stays_untouched_and_dims_are_named(tmp_path):
    built = tiny("bert", batch=2, seq=16)
    cfg = attnopt.Config(overrides={"encoder.layer.0.*": None})
    fast = attnopt.optimize(built.model, built.inputs, cfg)
    res = attnopt.export_onnx(fast, built.inputs, tmp_path / "m.onnx")  # ORT fusions on
    graph = onnx.load(str(res.path)).graph
    attention = [n.op_type for n in graph.node if n.op_type in {"MultiHeadAttention", "Attention"}]
    assert attention == ["MultiHeadAttention"], "only the fused site may become an attention op"
    rows = {s.index: s for s in res.report.sites}
    assert rows[0].variant.startswith("untouched") and rows[0].attention_op is None
    assert rows[1].attention_op == "MultiHeadAttention"
    assert "site 0 encoder.layer.0.attention.self: untouched" in res.report.table()
    assert res.report.fusions.get("skip_layer_normalization", 0) > 0  # other fusions still run
    dims = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch_size", "sequence_length"]
    assert dims["last_hidden_state"] == ["batch_size", "sequence_length", 64]
    names = {d.dim_param for v in graph.value_info for d in v.type.tensor_type.shape.dim}
    assert not [n for n in names if re.fullmatch(r"s\d+", n)], names


def test_axis_names():
    assert axis_name("input_ids", 0, 2) == "batch_size"
    assert axis_name("decoder_input_ids", 1, 2) == "decoder_sequence_length"
    assert axis_name("x", 1, 3) == "sequence_length"
    assert axis_name("pixel_values", 3, 4) == "width"
    assert axis_name("x", 2, 5) == "x_dim2"


class _Half(nn.Module):
    """First call: probabilities and values; second call: their product."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, p=None, v=None):
        if p is not None:
            return p @ v
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return (q @ k.transpose(-1, -2) * 0.35).softmax(-1), v


class Interleaved(nn.Module):
    """Site 0 (``first``) finishes after site 1 (``second``): graph order != site order."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _Half(), _Half()

    def forward(self, x):
        p1, v1 = self.first(x)
        p2, v2 = self.second(x)
        o2 = self.second(x, p2, v2)
        return self.first(x, p1, v1) * 2 + o2


def test_export_rows_are_paired_by_site_not_position(tmp_path):
    x = torch.randn(2, 12, 32)
    cfg = attnopt.Config(overrides={"first": attnopt.SlidingWindow(window=4),
                                    "second": attnopt.Fused()})
    fast = attnopt.optimize(Interleaved().eval(), (x,), cfg)
    assert [r.site.location for r in fast.report.rows] == ["first", "second"]
    res = attnopt.export_onnx(fast, (x,), tmp_path / "m.onnx", target="onnx")
    rows = {s.location: s for s in res.report.sites}
    assert rows["second"].attention_op == "Attention"  # fused: standard Attention
    assert rows["first"].attention_op is None  # sliding window: decomposed
