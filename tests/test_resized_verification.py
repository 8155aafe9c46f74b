"""Verification on inputs of another size: sizes the captured program accepts, never a crash.

torch.export records what its trace assumed about dynamic sizes as guards (a window partition
needs the length to be a multiple of the window); a fitted per-head state fixes the head count;
heads folded into the batch hide the head count from the ONNX lowerings. Each case must end in a
verified (or honestly noted) result, not an exception.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnopt
from attnopt._inputs import choose_resized, normalize
from attnopt.capture import capture, run_rewritten


class Windows(nn.Module):
    """Attention inside windows of ``w`` tokens (Swin's partition, along one axis)."""

    def __init__(self, c: int = 16, heads: int = 2, w: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.h, self.w = heads, w

    def forward(self, x):
        b, n, c = x.shape
        x = x.view(b * (n // self.w), self.w, c)
        q, k, v = self.qkv(x).view(x.shape[0], self.w, 3, self.h, c // self.h).permute(
            2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class QKV(nn.Module):
    """Attention on q, k, v given as inputs ``[B, H, L, D]``: every size is an input size."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v


class FoldedHeads(nn.Module):
    """einops-style ``(b h) n d`` attention (Perceiver), optionally causal."""

    def __init__(self, c: int = 32, heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.h, self.causal = heads, causal

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.h

        def fold(t):
            return t.reshape(b, n, self.h, d).permute(0, 2, 1, 3).reshape(b * self.h, n, d)

        q, k, v = map(fold, self.qkv(x).chunk(3, -1))
        s = torch.einsum("bid,bjd->bij", q, k) * d ** -0.5
        if self.causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("bij,bjd->bid", s.softmax(-1), v)
        return o.reshape(b, self.h, n, d).permute(0, 2, 1, 3).reshape(b, n, c)


def test_resized_sizes_pass_the_guards_of_a_window_partition():
    fast = attnopt.optimize(Windows().eval(), (torch.randn(2, 32, 16),))
    report = fast.report
    assert report.count("fused") == 1, report.table()
    assert len(report.end_to_end) == 2, report.notes
    alt = fast._captured.alt_inputs.args[0]
    assert alt.shape[1] != 32 and alt.shape[1] % 4 == 0 and alt.shape[0] != 2
    assert all(e.rel <= 1e-4 for e in report.end_to_end.values())


def test_guard_failure_on_the_graph_is_a_result_not_an_exception():
    model = Windows().eval()
    captured = capture(model, normalize((torch.randn(2, 32, 16),)))
    run = run_rewritten(captured, normalize((torch.randn(2, 34, 16),)))
    assert run.output is None and not run.rewrite_at_fault
    assert "captured graph rejects" in run.failure and "Guard failed" in run.failure


def _captured_shapes(model, inputs):
    captured = capture(model, normalize(inputs))
    shapes = [tuple(n.meta["val"].shape) for n in captured.gm.graph.nodes
              if n.op == "placeholder"]
    return captured, shapes


def test_fallback_changes_only_what_the_guards_accept():
    model = Windows().eval()
    captured, shapes = _captured_shapes(model, (torch.randn(2, 32, 16),))
    ranges = captured.program.range_constraints

    def length_fixed(flat):
        return None if flat[0].shape[1] == 32 else "length must stay 32"

    chosen = choose_resized(captured.inputs, shapes, ranges, accept=length_fixed)
    assert chosen.inputs.args[0].shape == (4, 32, 16)
    assert "input 0 dim 1" in chosen.note and "length must stay 32" in chosen.note

    nothing = choose_resized(captured.inputs, shapes, ranges, accept=lambda flat: "no")
    assert nothing.inputs is None
    assert "verified on the example inputs only" in nothing.note


def test_per_head_state_keeps_the_head_count_of_the_example(tmp_path):
    pytest.importorskip("onnxruntime")
    q, k, v = (torch.randn(1, 6, 40, 16) for _ in range(3))
    cfg = attnopt.Config(variant=attnopt.Linear(feature_map="elu", steps=10))
    fast = attnopt.optimize(QKV(), (q, k, v), cfg)
    report = fast.report
    assert report.count("rewritten") == 1, report.table()
    assert len(report.end_to_end) == 2, report.notes
    alt_q, _, alt_v = fast._captured.alt_inputs.args
    assert alt_q.shape[1] == 6 and alt_q.shape[3] == 16 and alt_v.shape[3] == 16
    assert alt_q.shape[2] != 40  # the length still changes
    assert any("keep the example size" in n and "heads" in n for n in report.notes)
    # The export keeps those dims static too (the lowering reads them as constants).
    res = attnopt.export_onnx(fast, (q, k, v), tmp_path / "m.onnx")
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4


# One export per case (exports take seconds): every variant, both targets, with and without
# a causal mask across the three.
FOLDED_CASES = [
    (attnopt.SlidingWindow(window=8), False, "onnxruntime"),
    (attnopt.BlockTopK(block=8, k=2), True, "onnx"),
    (attnopt.Linear(feature_map="elu"), True, "onnxruntime"),
]


@pytest.mark.parametrize("variant,causal,target", FOLDED_CASES,
                         ids=["sliding_window-full-ort", "block_topk-causal-onnx",
                              "linear-causal-ort"])
def test_heads_folded_into_the_batch_export_with_approximate_variants(variant, causal, target,
                                                                      tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = FoldedHeads(causal=causal).eval(), (torch.randn(2, 40, 32),)
    fast = attnopt.optimize(model, x, attnopt.Config(variant=variant))
    assert fast.report.count("rewritten") == 1, fast.report.table()
    assert fast.report.sites[0].heads is None  # the head count is folded into the batch
    res = attnopt.export_onnx(fast, x, tmp_path / "m.onnx", target=target)
    assert len(res.report.parity) == 2  # the example and another batch size / length
    assert res.report.max_error <= 1e-4, res.report.parity
