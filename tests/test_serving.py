"""Triton model repositories: configs checked by Triton's own schema, and the semantic checks.

Fast: small ONNX files made with ``onnx.helper`` (no torch export). The exported tiny models are
served in tests/test_serving_e2e.py (bert, vit) and, opt-in, every
model-table architecture (ATTNOPT_SERVE_ALL_MODELS=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from attnopt.errors import ConfigError
from attnopt.models import TINY
from attnopt.serving import DynamicBatching, check_model_dir, write_triton_repository
from attnopt.serving._schema import check_semantics, model_config_module, parse_config


def _onnx(path: Path, batch: int | str = "batch") -> Path:
    """x:[batch, seq, 4] float, mask:[batch, seq] int64 → y:[batch, seq, 4] (Add + Cast)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "seq", 4])
    m = helper.make_tensor_value_info("mask", TensorProto.INT64, [batch, "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, "seq", 4])
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]),
             helper.make_node("Add", ["x", "mu"], ["y"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph(nodes, "g", [x, m], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def model_file(tmp_path) -> Path:
    return _onnx(tmp_path / "m.onnx")


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_written_config_parses_with_tritons_schema(tmp_path, model_file, backend):
    m = write_triton_repository(model_file, tmp_path / "repo", "m", backend=backend,
                                max_batch_size=16, instances=2,
                                dynamic_batching=DynamicBatching(preferred_batch_sizes=(4, 16),
                                                                 max_queue_delay_us=250))
    config = check_model_dir(m.model_dir)
    assert config.name == "m" and config.max_batch_size == 16
    if backend == "onnxruntime":
        assert config.platform == "onnxruntime_onnx" and config.optimization.graph.level == 1
        assert (m.model_dir / "1" / "model.onnx").is_file()
    else:
        assert config.backend == "python"
        assert (m.model_dir / "1" / "model.py").is_file()
        assert config.parameters["onnx_file"].string_value == "model.onnx"
    ins = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    mc = model_config_module()
    assert ins == {"x": (mc.TYPE_FP32, [-1, 4]), "mask": (mc.TYPE_INT64, [-1])}  # batch dropped
    assert [(t.name, list(t.dims)) for t in config.output] == [("y", [-1, 4])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]


def test_gpu_kind_and_no_batching(tmp_path, model_file):
    m = write_triton_repository(model_file, tmp_path / "repo", "m", max_batch_size=0,
                                device="gpu")
    config = check_model_dir(m.model_dir)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[-1, -1, 4], [-1, -1]]  # batch kept
    assert "kind: KIND_GPU" in m.config_text


def test_tensorrt_plan_layout(tmp_path, model_file):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")  # the writer copies it; only TensorRT reads it
    m = write_triton_repository(model_file, tmp_path / "repo", "m", backend="tensorrt",
                                engine=plan)
    config = check_model_dir(m.model_dir)
    assert config.platform == "tensorrt_plan"
    assert (m.model_dir / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert "KIND_GPU" in m.config_text and "onnx_file" not in m.config_text


def _good_text(model_file, tmp_path) -> str:
    return write_triton_repository(model_file, tmp_path / "good", "m",
                                   overwrite=True).config_text


def test_misspelled_field_is_rejected_with_a_suggestion(tmp_path, model_file):
    text = _good_text(model_file, tmp_path).replace("max_queue_delay_microseconds",
                                                    "max_queue_delay_microsecond")
    with pytest.raises(ConfigError, match=r"no field named \"max_queue_delay_microsecond\".*"
                                          r"did you mean 'max_queue_delay_microseconds'"):
        parse_config(text)
    text = _good_text(model_file, tmp_path).replace("instance_group", "instance_groups")
    with pytest.raises(ConfigError, match="instance_groups.*did you mean 'instance_group'"):
        parse_config(text)


def test_wrong_enum_is_rejected_with_the_allowed_values(tmp_path, model_file):
    text = _good_text(model_file, tmp_path).replace("KIND_CPU", "KIND_CPUU")
    with pytest.raises(ConfigError, match="KIND_CPUU.*did you mean 'KIND_CPU'.*KIND_GPU"):
        parse_config(text)
    text = _good_text(model_file, tmp_path).replace("TYPE_FP32", "TYPE_FLOAT32")
    with pytest.raises(ConfigError, match="TYPE_FLOAT32"):
        parse_config(text)


def _io(model_file):
    from attnopt.serving._onnx_io import model_io

    return model_io(model_file)


def test_inconsistent_batch_dims_are_rejected(tmp_path, model_file):
    good = _good_text(model_file, tmp_path)
    # the batch dim written out although max_batch_size > 0 adds it
    text = good.replace("dims: [ -1, 4 ]", "dims: [ -1, -1, 4 ]", 1)
    with pytest.raises(ConfigError, match=r"include the batch dimension.*write dims \[-1, 4\]"):
        check_semantics(parse_config(text), _io(model_file))
    # batch dim dropped although max_batch_size is 0
    text = good.replace("max_batch_size: 8", "max_batch_size: 0").split("dynamic_batching")[0]
    with pytest.raises(ConfigError, match=r"dims \[-1, 4\] differ from the model file's "
                                          r"\[-1, -1, 4\]"):
        check_semantics(parse_config(text), _io(model_file))
    # preferred batch size above the limit
    text = good.replace("preferred_batch_size: [ 4, 8 ]", "preferred_batch_size: [ 4, 32 ]")
    with pytest.raises(ConfigError, match="preferred_batch_size 32 is outside 1..max_batch_size"):
        check_semantics(parse_config(text), _io(model_file))
    # a model file with a fixed batch of 2 cannot be batched by Triton
    fixed = _onnx(tmp_path / "fixed.onnx", batch=2)
    with pytest.raises(ConfigError, match=r"first dim fixed to 2.*max_batch_size=0"):
        write_triton_repository(fixed, tmp_path / "repo", "fixed")
    assert not (tmp_path / "repo").exists()  # nothing left behind
    m = write_triton_repository(fixed, tmp_path / "repo", "fixed", max_batch_size=0)
    assert [list(t.dims) for t in check_model_dir(m.model_dir).input] == [[2, -1, 4], [2, -1]]


def test_names_and_types_must_match_the_model_file(tmp_path, model_file):
    good = _good_text(model_file, tmp_path)
    with pytest.raises(ConfigError, match=r"input \['masks'\] not in the model file"):
        check_semantics(parse_config(good.replace('"mask"', '"masks"')), _io(model_file))
    with pytest.raises(ConfigError, match="data_type TYPE_INT32 but the model file has "
                                          "TYPE_INT64"):
        check_semantics(parse_config(good.replace("TYPE_INT64", "TYPE_INT32")), _io(model_file))
    with pytest.raises(ConfigError, match="differs from its directory"):
        check_semantics(parse_config(good), _io(model_file), dir_name="other")


def test_bad_arguments_are_config_errors_and_leave_nothing(tmp_path, model_file):
    repo = tmp_path / "repo"
    for kwargs, msg in [({"name": "a b"}, "model name"),
                        ({"backend": "tf"}, "backend 'tf'"),
                        ({"max_batch_size": -1}, "max_batch_size"),
                        ({"instances": 0}, "instances"),
                        ({"backend": "tensorrt"}, "needs engine"),
                        ({"dynamic_batching": DynamicBatching(preferred_batch_sizes=(64,))},
                         "exceed max_batch_size")]:
        args = {"name": "m", **kwargs}
        with pytest.raises(ConfigError, match=msg):
            write_triton_repository(model_file, repo, **args)
        assert not repo.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        write_triton_repository(tmp_path / "missing.onnx", repo, "m")
    write_triton_repository(model_file, repo, "m")
    with pytest.raises(ConfigError, match="already exists"):
        write_triton_repository(model_file, repo, "m")
    m = write_triton_repository(model_file, repo, "m", overwrite=True, backend="python")
    assert check_model_dir(m.model_dir).backend == "python"
    assert sorted(p.name for p in repo.iterdir()) == ["m"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATTNOPT_SERVE_ALL_MODELS") != "1",
                    reason="exports every model-table architecture (minutes); set "
                           "ATTNOPT_SERVE_ALL_MODELS=1")
@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_model_table_model_gets_a_valid_config(tmp_path, arch):
    import attnopt
    from attnopt.models import build

    built = build(f"tiny:{arch}", batch=2, seq=8)
    res = attnopt.export_onnx(built.model, built.inputs, tmp_path / f"{arch}.onnx")
    for backend in ("onnxruntime", "python"):
        m = write_triton_repository(res, tmp_path / backend, arch, backend=backend)
        config = check_model_dir(m.model_dir)
        assert [t.name for t in config.input] == res.input_names
        assert [t.name for t in config.output] == res.output_names


def test_session_providers_threads_and_iobinding(model_file):
    import numpy as np
    import onnxruntime as ort
    import torch

    from attnopt.export.onnx import ExportReport, ExportResult

    res = ExportResult(model_file, "onnx", ["x", "mask"], ["y"], ExportReport("onnx", 21))
    sess = res.session(threads=1)
    expected = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                if p in ort.get_available_providers()]
    assert sess.get_providers() == expected
    assert res.session(providers=["cpu"]).get_providers() == ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match="'TensorrtExecutionProvider' is not available"):
            res.session(providers=["tensorrt", "cpu"])
    with pytest.raises(ConfigError, match="not an onnxruntime.SessionOptions attribute"):
        res.session(intra_op_threads=2)
    inputs = {"x": torch.randn(2, 5, 4), "mask": torch.ones(2, 5, dtype=torch.long)}
    binding = res.bind(sess, inputs, device="cpu")
    sess.run_with_iobinding(binding)
    got = binding.copy_outputs_to_cpu()[0]
    ref = sess.run(None, res.feed(inputs))[0]
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got, inputs["x"].numpy() + 1.0)
