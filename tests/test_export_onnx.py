"""ONNX export: one attention op per site, parity in real onnxruntime sessions, clean failures."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from zoo import CASES, Classifier, GQARepeatKV, MulScale

import attnopt
from attnopt.models import TINY, tiny

ORT_ATTENTION = {"MultiHeadAttention", "GroupQueryAttention"}
# HF Swin infers its head count with ``view(..., -1, head_size)`` on window-partitioned tensors: in
# a dynamic-shape export the head dim is a symbolic expression torch cannot prove constant, and
# ORT's MultiHeadAttention needs a static head count, so those sites fall back to the standard
# ``Attention`` op (which ORT also runs; parity is still checked).
STANDARD_FALLBACK = {"swin", "swinv2"}


def _attention_ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node
            if n.op_type in {"Attention", *ORT_ATTENTION}]


# Swin (~55 s here) and Swin-v2 (~70 s: window attention at two input sizes) run only with
# ATTNOPT_ALL_ARCHS=1, to keep the default suite under CI's limit; benchmarks/model_table.py
# exports both to both targets (the standard-Attention fallback above).
SLOW_EXPORTS = set() if os.environ.get("ATTNOPT_ALL_ARCHS") == "1" else {"swin", "swinv2"}


@pytest.mark.parametrize("arch", sorted(set(TINY) - SLOW_EXPORTS))
def test_hf_models_export_to_onnxruntime_with_parity(arch, tmp_path):
    built = tiny(arch, batch=2, seq=24)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx")
    ops = _attention_ops(res.path)
    allowed = ORT_ATTENTION | ({"Attention"} if arch in STANDARD_FALLBACK else set())
    assert len(ops) == built.expected_sites and set(ops) <= allowed
    assert "Softmax" not in res.report.op_counts
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4
    assert all(s.attention_op in allowed for s in res.report.sites)
    sess = res.session()
    out = sess.run(None, res.feed(built.inputs))
    with torch.no_grad():
        ref = built.model(**built.inputs, use_cache=False) if "use_cache" in \
            built.model.forward.__code__.co_varnames else built.model(**built.inputs)
    first = ref[0] if isinstance(ref, tuple) else next(iter(ref.values()))
    assert attnopt.verify.compare(first, torch.from_numpy(out[0])).rel <= 1e-4


# deberta_v2: padded query rows whose scores all sit at finfo.min plus a position bias
@pytest.mark.parametrize("arch", ["bert", "llama", "whisper", "t5", "clip", "deberta_v2"])
def test_standard_onnx_attention_target(arch, tmp_path):
    built = tiny(arch, batch=2, seq=24)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx", target="onnx")
    model = onnx.load(str(res.path))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, "standard opsets only"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "standard ops only"
    assert _attention_ops(res.path) == ["Attention"] * built.expected_sites
    assert res.report.max_error <= 1e-4


def test_hf_style_names_and_dynamic_axes(tmp_path):
    built = tiny("bert")
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx")
    assert res.input_names == ["input_ids", "attention_mask"]
    assert res.output_names == ["last_hidden_state", "pooler_output"]
    assert any("dynamic axes: input_ids[0, 1]" in n for n in res.report.notes)


def test_vit_reports_axes_the_model_fixes(tmp_path):
    built = tiny("vit")
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx")
    note = next(n for n in res.report.notes if n.startswith("dynamic axes"))
    assert "pixel_values[0]" in note and "fixed by the model: pixel_values[1=3, 2=32, 3=32]" in note


def test_gqa_causal_without_mask_uses_group_query_attention(tmp_path):
    built = tiny("llama")
    inputs = {"input_ids": built.inputs["input_ids"]}
    res = attnopt.export_onnx(built.model, inputs, tmp_path / "m.onnx")
    assert _attention_ops(res.path) == ["GroupQueryAttention"] * 2
    assert res.report.max_error <= 1e-4


@pytest.mark.parametrize("name", ["causal_tril_buffer", "folded_bmm", "einsum_blhd", "alibi",
                                  "cross_attention", "mha_masks", "transformer_decoder_layer"])
def test_hand_written_attention_exports(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    model = case.build().eval()
    res = attnopt.export_onnx(model, case.inputs(), tmp_path / "m.onnx")
    ops = _attention_ops(res.path)
    assert len(ops) == case.sites and set(ops) <= ORT_ATTENTION
    assert res.report.max_error <= 1e-4


@pytest.mark.parametrize("name", ["folded_bmm", "baddbmm", "mha_need_weights_unused"])
def test_heads_folded_into_batch_become_multi_head_attention(name, tmp_path):
    """3-D attention code ([B·H, L, D], B·H dynamic) runs as B·H one-head sequences in ORT."""
    case = next(c for c in CASES if c.name == name)
    model = case.build().eval()
    fast = attnopt.optimize(model, case.inputs())
    q = next(n for n in fast.exported_program().graph.nodes
             if str(n.target) == "attnopt.attention.default").args[0].meta["val"]
    assert q.shape[0] == 1 and not isinstance(q.shape[1], int)  # heads folded, dynamic
    res = attnopt.export_onnx(fast, case.inputs(), tmp_path / "m.onnx")
    node = next(n for n in onnx.load(str(res.path)).graph.node if n.op_type in ORT_ATTENTION)
    assert node.op_type == "MultiHeadAttention"
    assert next(a.i for a in node.attribute if a.name == "num_heads") == 1
    assert res.report.max_error <= 1e-4


def test_fusions_that_break_the_graph_are_dropped_not_shipped(tmp_path, monkeypatch):
    """A graph the standard fusions break is exported unfused, with a note; never wrong."""
    import numpy as np
    import onnx_ir as ir

    from attnopt.export import onnx as onnx_export

    real = onnx_export._standard_fusions

    def fusions_with_a_bug(model, target, **options):
        model, counts = real(model, target, **options)
        weight = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
        weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(1.5))
        return model, counts

    monkeypatch.setattr(onnx_export, "_standard_fusions", fusions_with_a_bug)
    built = tiny("bert", batch=2, seq=24)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx")
    assert any(n.startswith("standard fusions dropped") for n in res.report.notes)
    assert res.report.fusions == {} and res.report.max_error <= 1e-4
    assert "SkipLayerNormalization" not in res.report.op_counts
    assert _attention_ops(res.path) == ["MultiHeadAttention"] * built.expected_sites
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_float16_model_is_validated_at_the_float16_tolerance(target, tmp_path):
    model = MulScale().eval().half()
    res = attnopt.export_onnx(model, (torch.randn(2, 12, 32).half(),), tmp_path / "m.onnx",
                              target=target)
    assert res.report.tolerance == attnopt.verify.default_tolerance(torch.float16)
    assert 0 < res.report.max_error <= res.report.tolerance
    assert len(_attention_ops(res.path)) == 1


def test_bfloat16_model_gets_a_clear_error_and_no_file(tmp_path):
    case = next(c for c in CASES if c.name == "float32_softmax_bf16")
    model = case.build().eval().to(torch.bfloat16)
    with pytest.raises(attnopt.ExportError, match="no kernel for this op.*bfloat16"):
        attnopt.export_onnx(model, case.inputs(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_exported_file_permissions_follow_the_umask(tmp_path):
    import os

    res = attnopt.export_onnx(MulScale().eval(), (torch.randn(2, 12, 32),), tmp_path / "m.onnx")
    umask = os.umask(0)
    os.umask(umask)
    assert res.path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exporting_an_optimized_model_does_not_retrace_the_user_model(tmp_path):
    class Counting(MulScale):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    model = Counting().eval()
    x = torch.randn(2, 12, 32)
    fast = attnopt.optimize(model, (x,))
    before = Counting.calls
    attnopt.export_onnx(fast, (x,), tmp_path / "m.onnx")
    assert Counting.calls == before


def test_unsupported_target_is_a_config_error(tmp_path):
    with pytest.raises(attnopt.ConfigError, match="unknown export target"):
        attnopt.export_onnx(MulScale(), (torch.randn(2, 12, 32),), tmp_path / "m.onnx",
                            target="tflite")


def test_unwritable_path_is_a_config_error(tmp_path):
    with pytest.raises(attnopt.ConfigError, match="does not exist"):
        attnopt.export_onnx(MulScale(), (torch.randn(2, 12, 32),), tmp_path / "no" / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("directory permissions are not enforced for this user (root)")
        with pytest.raises(attnopt.ConfigError, match="not writable"):
            attnopt.export_onnx(MulScale(), (torch.randn(2, 12, 32),), ro / "m.onnx")
    finally:
        ro.chmod(0o700)


def test_model_without_attention_exports_with_a_report_line(tmp_path):
    res = attnopt.export_onnx(Classifier().eval(), (torch.randn(2, 12, 32),), tmp_path / "m.onnx")
    assert any("no attention" in n for n in res.report.notes)
    assert res.path.exists() and _attention_ops(res.path) == []


def test_failed_validation_leaves_no_file_behind(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(attnopt.ValidationError) as info:
        attnopt.export_onnx(GQARepeatKV().eval(), (torch.randn(2, 12, 32),), path,
                            tolerance=1e-30)
    assert info.value.tolerance == 1e-30 and info.value.error > 0
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tmp_path):
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "attnopt.cli", "export", "tiny:gpt2", "-o",
                          str(tmp_path), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "gpt2.onnxruntime.onnx").exists()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["export"]["max_error"] <= 1e-4
    assert "exporting" in res.stderr
