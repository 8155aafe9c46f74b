"""ONNX lowerings of the sparse variants: onnxruntime (CPU) vs torch; no N×N tensor at run time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnopt
import attnopt.variants.block_topk as btk
import attnopt.variants.neighborhood2d as nbh
import attnopt.variants.sliding_window as swa
import attnopt.variants.streaming as stm
from attnopt.export._registry import translation_table

ort = pytest.importorskip("onnxruntime")
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _export(ep, target):
    program = torch.onnx.export(ep, dynamo=True, opset_version=23, optimize=False,
                                verbose=False, custom_translation_table=translation_table(target))
    return program.model_proto


def _session(proto, profile_dir=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "ort_profile")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _rel(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _ops(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


# -- the ops on canonical operands -----------------------------------------------------------------


class _Direct(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, mask):
        return self.fn(q, k, v, mask)


OPS = {
    "sliding_window": lambda q, k, v, m: swa.sliding_window(q, k, v, m, 5, False, 0.3),
    "sliding_window_causal": lambda q, k, v, m: swa.sliding_window(q, k, v, m, 7, True, 0.3),
    "streaming": lambda q, k, v, m: stm.streaming(q, k, v, m, 3, 9, 0.3),
    "block_topk": lambda q, k, v, m: btk.block_topk(q, k, v, m, 8, 2, False, True, 0.3),
    "block_topk_causal": lambda q, k, v, m: btk.block_topk(q, k, v, m, 16, 3, True, True, 0.3),
}


def _operands(n: int, mask: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=gen)
    k = torch.randn(2, 2, n, 8, generator=gen)
    v = torch.randn(2, 2, n, 6, generator=gen)
    if mask == "key":
        m = torch.ones(2, 1, 1, n, dtype=torch.bool)
        m[1, ..., n - 5:] = False
    else:  # a query-dependent additive mask with a finite fill
        keep = torch.rand(2, 1, n, n, generator=gen) > 0.3
        m = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    return q, k, v, m


# Every op with a key-padding mask; target onnxruntime takes the same lowering as onnx except
# for short static unmasked causal windows (tested below), so two ops check it; query-dependent
# masks on three ops.
CASES = [(n, "onnx", "key") for n in sorted(OPS)] + \
    [("sliding_window_causal", "onnxruntime", "key"), ("block_topk", "onnxruntime", "key")] + \
    [(n, "onnx", "full") for n in ("sliding_window", "streaming", "block_topk_causal")]


@pytest.mark.parametrize("name, target, mask", CASES, ids=["-".join(c) for c in CASES])
def test_op_lowering_matches_torch_at_two_lengths(name, target, mask):
    module = _Direct(OPS[name])
    seq = torch.export.Dim("seq", min=2, max=4096)
    dyn = ({2: seq}, {2: seq}, {2: seq}, {3: seq} if mask == "key" else {2: seq, 3: seq})
    ep = torch.export.export(module, _operands(37, mask, 0), dynamic_shapes=dyn)
    proto = _export(ep, target)
    sess = _session(proto)
    names = [i.name for i in sess.get_inputs()]
    for n, seed in ((37, 1), (101, 2)):  # neither is a multiple of a block
        x = _operands(n, mask, seed)
        want = module(*x).numpy()
        got = sess.run(None, dict(zip(names, (t.numpy() for t in x))))[0]
        assert _rel(want, got) < TOL, (name, n)


@pytest.mark.parametrize("name, length, cap", [
    ("sliding_window", 2048, 1 << 20),
    ("streaming", 2048, 1 << 20),
    ("block_topk_causal", 2048, 2 << 20),
])
def test_no_node_produces_an_n_by_n_tensor(name, length, cap, tmp_path):
    """ORT's profiler records every node's output size: all stay O(N·Kc), far below N×N."""
    module = _Direct(OPS[name])
    x = tuple(t[:1, :1] for t in _operands(length, "key", 0)[:3]) + (
        torch.ones(1, 1, 1, length, dtype=torch.bool),)
    proto = _export(torch.export.export(module, x), "onnx")
    sess = _session(proto, profile_dir=tmp_path)
    sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    sizes = [int(e["args"].get("output_size", 0)) for e in events if e.get("cat") == "Node"]
    assert sizes and max(sizes) <= cap < length * length * 4 // 4, max(sizes)


def test_short_static_causal_window_uses_group_query_attention():
    module = _Direct(OPS["sliding_window_causal"])
    q, k, v, _ = _operands(40, "key", 0)
    x = (q, k, torch.cat([v, v[..., :2]], dim=-1), None)  # GQA needs Dv == D
    ep = torch.export.export(module, x)
    proto = _export(ep, "onnxruntime")
    assert "GroupQueryAttention" in _ops(proto)
    assert "GroupQueryAttention" not in _ops(_export(ep, "onnx"))
    sess = _session(proto)
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x[:3])})[0]
    assert _rel(module(*x).numpy(), got) < TOL


@pytest.mark.parametrize("gh, gw, kernel, dilation, prefix, mask, target", [
    (7, 9, 3, 1, 1, "key", "onnx"),
    (9, 11, 3, 2, 0, "full", "onnxruntime"),
])
def test_neighborhood_lowering_matches_torch(gh, gw, kernel, dilation, prefix, mask, target):
    module = _Direct(lambda q, k, v, m: nbh.neighborhood2d(q, k, v, m, kernel, dilation, gh, gw,
                                                           0.3))
    x = _operands(prefix + gh * gw, mask, 3)
    sess = _session(_export(torch.export.export(module, x), target))
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), x)})[0]
    assert _rel(module(*x).numpy(), got) < TOL


# -- whole models through attnopt.optimize ---------------------------------------------------------


def _text_feeds(n: int, seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, n), generator=gen)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, n - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _first(out):
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach().numpy()


@pytest.mark.parametrize("spec, config, target", [
    ("tiny:llama", swa.SlidingWindow(window=8), "onnxruntime"),
    pytest.param("tiny:llama", stm.Streaming(sinks=2, window=8), "onnx",
                 marks=pytest.mark.slow),
    pytest.param("tiny:bert", swa.SlidingWindow(window=6), "onnx", marks=pytest.mark.slow),
    pytest.param("tiny:bert-sdpa", btk.BlockTopK(block=8, k=2), "onnxruntime",
                 marks=pytest.mark.slow),
], ids=lambda x: x if isinstance(x, str) else None)
def test_optimized_model_exports_and_matches_in_onnxruntime(spec, config, target):
    from attnopt.models import build

    built = build(spec, seq=40)
    fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(variant=config))
    assert all(r.outcome == "rewritten" for r in fast.report.rows), fast.report.table()
    proto = _export(fast.exported_program(), target)
    sess = _session(proto)
    names = [i.name for i in sess.get_inputs()]
    for n, seed in ((40, 0), (77, 1)):
        feeds = _text_feeds(n, seed)
        with torch.no_grad():
            want = _first(fast(**feeds))
        got = sess.run(None, {k: feeds[k].numpy() for k in names})[0]
        assert _rel(want, got) < TOL, (n, _rel(want, got))


@pytest.mark.slow
def test_vit_with_neighborhood_attention_exports_at_two_grid_sizes():
    from transformers import ViTConfig, ViTModel

    for image in (40, 56):  # 26 and 50 tokens (5x5 and 7x7 patches + [CLS])
        torch.manual_seed(0)
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, image_size=image, patch_size=8)
        model = ViTModel(cfg).eval()
        x = {"pixel_values": torch.randn(2, 3, image, image)}
        fast = attnopt.optimize(model, x, attnopt.Config(variant=nbh.Neighborhood2D(kernel=3)))
        assert [r.outcome for r in fast.report.rows] == ["rewritten"]
        sess = _session(_export(fast.exported_program(), "onnxruntime"))
        with torch.no_grad():
            want = _first(fast(**x))
        got = sess.run(None, {"pixel_values": x["pixel_values"].numpy()})[0]
        assert _rel(want, got) < TOL
