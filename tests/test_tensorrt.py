"""TensorRT target: TensorRT-ready exports, the GPU-free compatibility check, profiles, engines.

Exports are real (torch.export → ONNX → onnx.checker → onnxruntime parity → the check); the
check is run on real exports and on small files built with ``onnx.helper`` that break one
documented rule each. Engine builds need ``tensorrt`` and a CUDA GPU: marked ``gpu``.
"""

from __future__ import annotations

import json
import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from zoo import CASES

import attnopt
from attnopt.models import TINY, tiny
from attnopt.tensorrt import EngineBuildError, check, profiles_from_onnx
from attnopt.tensorrt.engine import import_tensorrt

STANDARD = {"", "ai.onnx"}


def _case(name):
    return next(c for c in CASES if c.name == name)


def _assert_tensorrt_ready(res, version: str = "11.4") -> onnx.ModelProto:
    """Every tensorrt-target file: check passes, full onnx.checker, standard ops, commands."""
    result = check(res.path, version)
    assert result.ok, str(result)
    onnx.checker.check_model(str(res.path), full_check=True)
    model = onnx.load(str(res.path))
    assert {n.domain for n in model.graph.node} <= STANDARD
    types = {v.name: v.type.tensor_type.elem_type for v in [
        *onnx.shape_inference.infer_shapes(model).graph.value_info, *model.graph.input]}
    for node in model.graph.node:
        if node.op_type == "Attention":
            assert len(node.output) == 1
            assert not {a.name for a in node.attribute} & {"qk_matmul_output_mode", "softcap"}
            if len(node.input) > 3 and types.get(node.input[3]) != TensorProto.BOOL:
                assert types.get(node.input[3]) == types[node.input[0]]  # mask in q's dtype
    text = res.path.with_name(res.path.stem + ".trt.txt").read_text()
    assert f"--onnx={res.path.name}" in text and "--stronglyTyped" in text
    assert "polygraphy run" in text and "--trt --onnxrt" in text
    return model


def _attention_ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type in ("Attention", "Softmax")]


# -- one export shared by the file-level tests -----------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """tiny bert: layer 0 exact (one Attention node), layer 1 a bidirectional sliding window
    (block-wise band decomposition)."""
    built = tiny("bert", batch=2, seq=24)
    path = tmp_path_factory.mktemp("trt") / "bert.onnx"
    config = attnopt.Config(overrides={"encoder.layer.1.*": attnopt.SlidingWindow(window=4)})
    res = attnopt.export_onnx(built.model, built.inputs, path, target="tensorrt", config=config)
    return res, built


def test_bert_export_is_tensorrt_ready_and_matches_torch(bert):
    res, _ = bert
    model = _assert_tensorrt_ready(res)
    assert _attention_ops(model) == ["Attention", "Softmax"]
    assert [s.variant.split("(")[0] for s in res.report.sites] == ["fused", "SlidingWindow"]
    assert res.report.target == "tensorrt" and len(res.report.parity) == 2
    assert res.report.max_error <= 1e-4
    assert any("TensorRT 11.4 check passed" in n for n in res.report.notes)


def test_dynamic_dims_are_named_and_verified_ranges_recorded(bert):
    res, _ = bert
    model = onnx.load(str(res.path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch_size", "sequence_length"]
    assert dims["last_hidden_state"] == ["batch_size", "sequence_length", 64]
    meta = {p.key: p.value for p in model.metadata_props}
    ranges = json.loads(meta["attnopt.tensorrt.shape_ranges"])
    # opt: the example inputs; min / max: over the example and the resized inputs validated
    assert ranges["input_ids"]["opt"] == [2, 24]
    assert ranges["input_ids"]["min"] == [2, 24] and ranges["input_ids"]["max"][0] > 2
    assert meta["attnopt.tensorrt.version"] == "11.4"
    assert meta["attnopt.tensorrt.precision"] == "fp32"


def test_profiles_derive_from_the_recorded_ranges(bert):
    res, _ = bert
    (profile,) = profiles_from_onnx(res.path)
    ranges = json.loads({p.key: p.value for p in onnx.load(str(res.path)).metadata_props}[
        "attnopt.tensorrt.shape_ranges"])
    for name in ("input_ids", "attention_mask"):
        mn, opt, mx = profile.shapes[name]
        assert [list(mn), list(opt), list(mx)] == [ranges[name][k] for k in ("min", "opt",
                                                                              "max")]
    wide = {"input_ids": ((1, 1), (4, 128), (8, 512)),
            "attention_mask": ((1, 1), (4, 128), (8, 512))}
    assert profiles_from_onnx(res.path, wide)[0].shapes == wide
    assert len(profiles_from_onnx(res.path, [wide, wide])) == 2


@pytest.mark.parametrize("profile, message", [
    ({"input_ids": ((1, 1), (2, 8), (4, 16))}, "attention_mask.*no \\(min, opt, max\\)"),
    ({"input_ids": ((1, 1), (2, 8), (4, 16)), "attention_mask": ((1, 1), (2, 8), (4, 16)),
      "pixel_values": ((1,), (1,), (1,))}, "not inputs of the model"),
    ({"input_ids": ((1,), (2,), (4,)), "attention_mask": ((1, 1), (2, 8), (4, 16))},
     "rank 1; the input has rank 2"),
    ({"input_ids": ((1, 9), (2, 8), (4, 16)), "attention_mask": ((1, 9), (2, 8), (4, 16))},
     "need 0 < min <= opt <= max, got 9, 8, 16"),
    ({"input_ids": ((1, 1), (2, 8), (4, 16)), "attention_mask": ((1, 1), (2, 8), (4, 32))},
     "dim 'sequence_length' is shared"),
])
def test_bad_profiles_are_config_errors_naming_the_input(bert, profile, message):
    res, _ = bert
    with pytest.raises(attnopt.ConfigError, match=message):
        profiles_from_onnx(res.path, profile)


def test_static_dims_must_match_the_model(tmp_path):
    path = tmp_path / "m.onnx"
    _save(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                 inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                 outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])]),
          path)
    with pytest.raises(attnopt.ConfigError, match="axis 1 is fixed to 3"):
        profiles_from_onnx(path, {"x": ((1, 4), (2, 4), (4, 4))})
    with pytest.raises(attnopt.ConfigError, match="no recorded shape ranges"):
        profiles_from_onnx(path)


def test_cli_check_trt_exit_codes(bert, tmp_path, capsys):
    from attnopt.cli import main

    res, _ = bert
    assert main(["check-trt", str(res.path), "--version", "11.4",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    bad = tmp_path / "bad.onnx"
    _save(_model([helper.make_node("Unique", ["x"], ["y"], name="uniq")]), bad)
    assert main(["check-trt", str(bad)]) == 1
    assert "node 'uniq' (Unique)" in capsys.readouterr().out
    assert main(["check-trt", str(bad), "--version", "7.0"]) == 2


def test_build_engine_without_tensorrt_is_a_typed_error(bert, tmp_path):
    try:
        import_tensorrt()
    except EngineBuildError:
        pass
    else:
        pytest.skip("tensorrt is installed here: the missing-package path cannot be checked")
    res, _ = bert
    with pytest.raises(EngineBuildError, match="'tensorrt' Python package is not installed"):
        attnopt.tensorrt.build_engine(res.path, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_engine_build_and_parity_on_a_gpu(request, tmp_path):
    try:
        import_tensorrt()
    except EngineBuildError as e:
        pytest.skip(f"needs the tensorrt package and a CUDA GPU: {e}"[:200])
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    from attnopt.tensorrt.engine import parity

    res, built = request.getfixturevalue("bert")  # only once TensorRT is known to be there
    fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(
        overrides={"encoder.layer.1.*": attnopt.SlidingWindow(window=4)}))
    build = attnopt.tensorrt.build_engine(res.path, tmp_path / "m.plan",
                                          timing_cache=tmp_path / "t.cache")
    assert build.plan_path.stat().st_size > 0 and (tmp_path / "t.cache").exists()
    # float32 graph, but TensorRT's builder enables TF32 matmuls by default (10-bit mantissa)
    assert parity(fast, built.inputs, res, build.plan_path).rel <= 1e-2


# -- more exports: GQA, encoder-decoder, fp16, older TensorRT, variants, zoo -----------------------


def test_older_tensorrt_gets_the_decomposed_pattern(tmp_path):
    """Pre-10.14: MatMul -> Add(mask) -> Softmax -> MatMul, opset converted to 20; gpt2's second
    layer is a streaming site (sinks + causal band, one Softmax)."""
    config = attnopt.Config(overrides={"transformer.h.1.*": attnopt.Streaming(sinks=2, window=4)})
    res = _export_tiny_and_check("gpt2", "10.13", None, tmp_path, config)
    assert [s.variant.split("(")[0] for s in res.report.sites] == ["fused", "Streaming"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("precision", [None, "fp16"])
def test_every_tiny_model_exports_for_tensorrt(arch, precision, tmp_path):
    """Opt-in (ATTNOPT_TRT_ALL=1, ~5 min): every model of the supported-models table;
    benchmarks/tensorrt_exports.py records the same survey with its numbers."""
    if not os.environ.get("ATTNOPT_TRT_ALL"):
        pytest.skip("every tiny model x precision takes minutes: set ATTNOPT_TRT_ALL=1")
    _export_tiny_and_check(arch, "11.4", precision, tmp_path)


def _export_tiny_and_check(arch, version, precision, tmp_path, config=None):
    built = tiny(arch, batch=2, seq=16)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx",
                              target="tensorrt", tensorrt_version=version,
                              precision=precision, config=config)
    model = _assert_tensorrt_ready(res, version)
    if version == "11.4":
        assert _attention_ops(model) == ["Attention"] * built.expected_sites
    else:
        assert _attention_ops(model) == ["Softmax"] * built.expected_sites
        assert model.opset_import[0].version == 20 and res.report.opset == 20
    tol = 1e-2 if precision == "fp16" else 1e-4
    assert len(res.report.parity) == 2 and res.report.max_error <= tol
    if precision == "fp16":
        assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    return res


def test_gqa_model_exports_in_fp16(tmp_path):
    """tiny llama in fp16: layer 0 exact (GQA from the shapes, causal folded into the padding
    mask, the mask in fp16), layer 1 block top-k (float32 inside, fp16 at the boundary)."""
    built = tiny("llama", batch=2, seq=16)
    config = attnopt.Config(overrides={"model.layers.1.*": attnopt.BlockTopK(block=4, k=1)})
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx", target="tensorrt",
                              config=config, precision="fp16")
    model = _assert_tensorrt_ready(res)
    assert _attention_ops(model) == ["Attention", "Softmax"]
    assert [s.variant.split("(")[0] for s in res.report.sites] == ["fused", "BlockTopK"]
    (attn,) = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attn.input) == 4 and not next(
        (a.i for a in attn.attribute if a.name == "is_causal"), 0)
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-2


@pytest.mark.slow
def test_linear_variant_exports_for_tensorrt(tmp_path):
    if not os.environ.get("ATTNOPT_TRT_ALL"):
        pytest.skip("the linear variant's optimize step takes ~30 s here: set ATTNOPT_TRT_ALL=1 "
                    "(benchmarks/results/tensorrt_exports.md has its export)")
    case = _case("causal_plus_padding")
    res = attnopt.export_onnx(case.build().eval(), case.inputs(), tmp_path / "m.onnx",
                              target="tensorrt",
                              config=attnopt.Config(variant=attnopt.Linear(feature_map="elu")))
    _assert_tensorrt_ready(res)
    assert res.report.max_error <= 1e-4


def test_neighborhood2d_exports_for_tensorrt(tmp_path):
    built = tiny("vit")
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx", target="tensorrt",
                              config=attnopt.Config(variant=attnopt.Neighborhood2D(kernel=3)))
    _assert_tensorrt_ready(res)
    assert all("Neighborhood2D" in s.variant for s in res.report.sites), res.report.sites
    assert res.report.max_error <= 1e-4


@pytest.mark.parametrize("name, precision", [
    ("folded_bmm", None),           # heads folded into the batch: B·H one-head sequences
    ("gqa_repeat_kv", "fp16"),      # GQA from the shapes, fp16 graph
    ("causal_plus_padding", None),  # causal folded into the padding mask (mask xor causal)
])
def test_zoo_spellings_export_for_tensorrt(name, precision, tmp_path):
    case = _case(name)
    res = attnopt.export_onnx(case.build().eval(), case.inputs(), tmp_path / "m.onnx",
                              target="tensorrt", precision=precision)
    model = _assert_tensorrt_ready(res)
    assert _attention_ops(model) == ["Attention"] * case.sites
    for node in model.graph.node:
        if node.op_type == "Attention":  # IAttention: a mask or a causal flag, not both
            causal = next((a.i for a in node.attribute if a.name == "is_causal"), 0)
            assert not (causal and len(node.input) > 3 and node.input[3])
    assert len(res.report.parity) == 2
    assert res.report.max_error <= (1e-2 if precision else 1e-4)


def test_bfloat16_export_is_checked_structurally(tmp_path):
    case = _case("mul_scale")
    res = attnopt.export_onnx(case.build().eval(), case.inputs(), tmp_path / "m.onnx",
                              target="tensorrt", precision="bf16")
    model = _assert_tensorrt_ready(res)
    assert res.report.parity == {}  # onnxruntime's CPU provider has no bf16 kernels for these
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    floats = [i.data_type for i in model.graph.initializer
              if i.data_type in (TensorProto.FLOAT, TensorProto.BFLOAT16) and len(i.dims)]
    assert floats and set(floats) == {TensorProto.BFLOAT16}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["attnopt.tensorrt.precision"] == "bf16"
    assert "not run in onnxruntime" in meta["attnopt.tensorrt.shape_ranges_verified"]


@pytest.mark.parametrize("version", ["11.4", "10.13"])
@pytest.mark.parametrize("arch, variant", [
    ("bert", attnopt.GroupKV(groups=2)),
    ("llama", attnopt.StreamingHeads(sinks=2, window=4, full_fraction=0.5)),
    ("bert", attnopt.PruneHeads(fraction=0.5)),
], ids=["GroupKV", "StreamingHeads", "PruneHeads"])
def test_head_variants_use_the_versions_exact_lowering(arch, variant, version, tmp_path):
    """Their exact attention is this version's form: an Attention node from 10.14, the
    decomposed pattern before (the "onnx" lowering's Attention-23 cannot be converted to the
    opset-20 file)."""
    built = tiny(arch, batch=2, seq=16)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / "m.onnx", target="tensorrt",
                              tensorrt_version=version, config=attnopt.Config(variant=variant))
    model = _assert_tensorrt_ready(res, version)
    name = type(variant).__name__
    assert [s.variant.split("(")[0] for s in res.report.sites] == [name] * built.expected_sites
    ops = {n.op_type for n in model.graph.node}
    assert ("Attention" in ops) == (version == "11.4")
    if version != "11.4":
        assert model.opset_import[0].version == 20
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4


@pytest.mark.parametrize("name, version", [
    ("tiny:gemma2", "11.4"), ("soft_capping", "11.4"), ("soft_capping", "10.13")])
def test_soft_capped_sites_are_decomposed_with_the_cap(name, version, tmp_path):
    """IAttention has no cap: MatMul -> Div -> Tanh -> Mul -> Add(mask) -> Softmax -> MatMul
    on every version, never an Attention node with a softcap attribute."""
    if name.startswith("tiny:"):
        built = tiny(name[5:], batch=2, seq=16)
        model, inputs, sites = built.model, built.inputs, built.expected_sites
    else:
        case = _case(name)
        model, inputs, sites = case.build().eval(), case.inputs(), case.sites
    res = attnopt.export_onnx(model, inputs, tmp_path / "m.onnx", target="tensorrt",
                              tensorrt_version=version)
    onnx_model = _assert_tensorrt_ready(res, version)
    assert _attention_ops(onnx_model) == ["Softmax"] * sites
    producer = {o: n for n in onnx_model.graph.node for o in n.output}
    for softmax in (n for n in onnx_model.graph.node if n.op_type == "Softmax"):
        chain, node = [], softmax  # back: Softmax <- Add(mask)? <- Mul <- Tanh <- Div <- MatMul
        while node.op_type != "MatMul" and len(chain) < 6:
            node = producer[node.input[0]]
            chain.append(node.op_type)
        assert [t for t in chain if t != "Add"] == ["Mul", "Tanh", "Div", "MatMul"], chain
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4


@pytest.mark.parametrize("name, op_type", [("tiny:opt", "CumSum"),
                                           ("t5_relative_bias", "Clip")])
def test_integer_cumsum_and_clip_are_computed_in_float(name, op_type, tmp_path):
    """Position ids (cumsum of the mask) and bucketed relative positions (clamp) are INT64 in
    the model; the matrix has CumSum / Clip on floating types only: Cast -> op -> Cast."""
    if name.startswith("tiny:"):
        built = tiny(name[5:], batch=2, seq=16)
        model, inputs = built.model, built.inputs
    else:
        case = _case(name)
        model, inputs = case.build().eval(), case.inputs()
    res = attnopt.export_onnx(model, inputs, tmp_path / "m.onnx", target="tensorrt")
    onnx_model = _assert_tensorrt_ready(res)
    producer = {o: n for n in onnx_model.graph.node for o in n.output}
    consumer = {i: n for n in onnx_model.graph.node for i in n.input}
    nodes = [n for n in onnx_model.graph.node if n.op_type == op_type]
    assert nodes
    for node in nodes:
        cast_in = producer[node.input[0]]
        assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT
        cast_out = consumer[node.output[0]]
        assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == TensorProto.INT64
    assert any(n.startswith(f"{op_type} ") and "computed in FP32" in n for n in res.report.notes)
    assert len(res.report.parity) == 2 and res.report.max_error <= 1e-4


class _PaddedQueries(torch.nn.Module):
    """DeBERTa-v2's mask: ``finfo.min`` wherever the query *or* the key is padding, so a padded
    query's row has every score at the float minimum (SDPA averages the values there)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        pair = keep[:, None, :, None] * keep[:, None, None, :]
        mask = (1.0 - pair) * torch.finfo(x.dtype).min
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("version", ["11.4", "10.13"])
def test_rows_masked_at_the_float_minimum_match_torch(version, tmp_path):
    """ONNX Runtime's Attention returned 0 on such rows before the mask got a finite floor."""
    torch.manual_seed(0)
    keep = torch.ones(2, 12)
    keep[1, 8:] = 0
    res = attnopt.export_onnx(_PaddedQueries().eval(), (torch.randn(2, 12, 32), keep),
                              tmp_path / "m.onnx", target="tensorrt", tensorrt_version=version)
    model = _assert_tensorrt_ready(res, version)
    assert _attention_ops(model) == ["Attention" if version == "11.4" else "Softmax"]
    assert res.report.max_error <= 1e-4


def test_export_arguments_are_validated(tmp_path):
    model, inputs = _case("mul_scale").build().eval(), _case("mul_scale").inputs()
    with pytest.raises(attnopt.ConfigError, match="apply to target='tensorrt' only"):
        attnopt.export_onnx(model, inputs, tmp_path / "m.onnx", precision="fp16")
    with pytest.raises(attnopt.ConfigError, match="no ONNX-TensorRT operator matrix"):
        attnopt.export_onnx(model, inputs, tmp_path / "m.onnx", target="tensorrt",
                            tensorrt_version="8.6")
    with pytest.raises(attnopt.ConfigError, match="precision must be one of"):
        attnopt.export_onnx(model, inputs, tmp_path / "m.onnx", target="tensorrt",
                            precision="int8")
    assert list(tmp_path.iterdir()) == []


# -- the check on files that break one rule each ---------------------------------------------------


def _model(nodes, inputs=None, outputs=None, opset=23, initializers=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _qkv():
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8, 4])
            for n in ("q", "k", "v")]


def test_check_rejects_com_microsoft_ops_by_node_name():
    node = helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["y"], name="mha_0",
                            domain="com.microsoft", num_heads=1)
    result = check(_model([node]))
    assert not result.ok
    (p,) = result.errors
    assert p.node == "mha_0" and "com.microsoft" in p.reason and "target='tensorrt'" in p.fix


def test_check_rejects_attention_with_present_outputs():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y", "present_key", "present_value"],
                            name="attn_kv")
    model = _model([node], inputs=_qkv(), outputs=[
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
        for n in ("y", "present_key", "present_value")])
    result = check(model)
    assert not result.ok
    assert any(p.node == "attn_kv" and "one output" in p.reason
               and "present_key, present_value" in p.reason for p in result.errors)


def test_check_rejects_attention_kv_cache_inputs_softcap_and_3d_operands():
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y"], name="a",
                            softcap=30.0)
    inputs = _qkv() + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4])
                       for n in ("pk", "pv")]
    reasons = " | ".join(p.reason for p in check(_model([node], inputs=inputs)).errors)
    assert "past_key, past_value" in reasons and "softcap" in reasons
    flat = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8]) for n in "qkv"]
    node3 = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="a3", q_num_heads=2,
                             kv_num_heads=2)
    (p,) = check(_model([node3], inputs=flat)).errors
    assert p.node == "a3" and "rank 3" in p.reason


def test_check_warns_on_attention_with_mask_and_causal():
    mask = helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, 8, 8])
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="a", is_causal=1)
    result = check(_model([node], inputs=[*_qkv(), mask]))
    assert result.ok and [p.severity for p in result.problems] == ["warning"]
    assert "setMask / setCausal" in result.problems[0].reason


@pytest.mark.parametrize("node, reason", [
    (helper.make_node("Unique", ["x"], ["y"], name="n"), "marked unsupported"),
    (helper.make_node("Frobnicate", ["x"], ["y"], name="n"), "not in TensorRT 11.4"),
    (helper.make_node("TopK", ["x", "kk"], ["y", "i"], name="n", sorted=0), "sorted=1"),
    (helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="n"), "computed at run time"),
], ids=["unique", "unknown_op", "topk_unsorted", "reduce_runtime_axes"])
def test_check_rejects_ops_outside_the_matrix_or_its_restrictions(node, reason):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("kk", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("ax", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT if o == "y" else
                                             TensorProto.INT64, None) for o in node.output]
    result = check(_model([node], inputs=inputs, outputs=outputs))
    assert any(p.node == "n" and reason in p.reason for p in result.errors), str(result)


def test_check_knows_types_opsets_and_versions():
    mm = helper.make_node("MatMul", ["a", "b"], ["y"], name="int_matmul")
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, [2, 2]) for n in "ab"]
    out = [helper.make_tensor_value_info("y", TensorProto.INT32, None)]
    (p,) = check(_model([mm], inputs=ints, outputs=out)).errors
    assert p.node == "int_matmul" and "INT32" in p.reason
    relu = helper.make_node("Relu", ["x"], ["y"], name="r")
    assert check(_model([relu], opset=20), "10.1").ok
    (p,) = check(_model([relu], opset=23), "10.1").errors
    assert "opset 23" in p.reason and "9-20" in p.reason
    attn = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="a")
    assert check(_model([attn], inputs=_qkv()), "10.14").ok
    assert not check(_model([attn], inputs=_qkv()), "10.13").ok  # parsed since 10.14
    with pytest.raises(attnopt.ConfigError, match="known versions are"):
        check(_model([relu]), "12.0")


def test_a_file_failing_the_check_is_an_export_error_and_not_written(tmp_path, monkeypatch):
    """The check runs inside the export: a lowering that emits contrib ops (an attnopt bug,
    simulated with the onnxruntime target's table) fails with the node, and leaves no file."""
    from attnopt.export._registry import translation_table
    from attnopt.tensorrt import _lowerings

    monkeypatch.setattr(_lowerings, "table", lambda version: translation_table("onnxruntime"))
    case = _case("mul_scale")
    with pytest.raises(attnopt.ExportError, match=r"not TensorRT 11.4-compatible(.|\n)*"
                                                  r"com\.microsoft::MultiHeadAttention"):
        attnopt.export_onnx(case.build().eval(), case.inputs(), tmp_path / "m.onnx",
                            target="tensorrt")
    assert list(tmp_path.iterdir()) == []
