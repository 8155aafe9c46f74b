"""User mistakes are reported as ConfigError naming the culprit; library chatter stays quiet."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from zoo import CausalTrilBuffer, MulScale

import attnopt
from attnopt.models import build, tiny


class TwoArgs(MulScale):
    def forward(self, x, bias):
        return super().forward(x) + bias


def test_missing_argument_names_it_and_the_signature():
    with pytest.raises(attnopt.ConfigError, match=r"missing a required argument: 'bias'") as e:
        attnopt.optimize(TwoArgs(), (torch.randn(2, 12, 32),))
    assert "TwoArgs.forward(x, bias)" in str(e.value)


def test_misspelled_key_suggests_the_argument():
    with pytest.raises(attnopt.ConfigError, match=r"'bais'.*did you mean 'bias'"):
        attnopt.optimize(TwoArgs(), {"x": torch.randn(2, 12, 32), "bais": torch.zeros(32)})


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", batch=2, seq=8)


def test_hf_misspelled_key_is_caught_despite_kwargs(llama):
    ids = llama.inputs["input_ids"]
    with pytest.raises(attnopt.ConfigError, match=r"'input_id'.*did you mean 'input_ids'"):
        attnopt.find_attention(llama.model, {"input_id": ids})


def test_hf_float_ids_name_the_argument(llama):
    ids = llama.inputs["input_ids"].float()
    with pytest.raises(attnopt.ConfigError, match=r"'input_ids' is float32\[2, 8\].*int64"):
        attnopt.find_attention(llama.model, {"input_ids": ids})


def test_model_rejecting_its_inputs_is_a_config_error(llama):
    """HF raises ValueError inside forward: the user's inputs, not a capture limitation."""
    mask = llama.inputs["attention_mask"]
    with pytest.raises(attnopt.ConfigError, match="rejected the example inputs.*input_ids"):
        attnopt.find_attention(llama.model, {"attention_mask": mask})


def test_float_token_ids_without_annotation_are_named():
    built = tiny("bert", batch=2, seq=8)  # BertModel annotates input_ids as a plain Tensor
    inputs = {"input_ids": built.inputs["input_ids"].float()}
    with pytest.raises(attnopt.ConfigError, match="floating-point indices.*input_ids"):
        attnopt.find_attention(built.model, inputs)


def test_list_inputs_are_refused_with_the_two_readings():
    with pytest.raises(attnopt.ConfigError, match=r"list.*tuple\(inputs\).*\(inputs,\)"):
        attnopt.optimize(MulScale(), [torch.randn(2, 12, 32)])


def test_nan_inputs_are_refused_naming_the_argument():
    x = torch.randn(2, 12, 32)
    x[0, 3, 5] = float("nan")
    with pytest.raises(attnopt.ConfigError, match="'x'.*NaN"):
        attnopt.optimize(MulScale(), {"x": x})


def test_override_matching_no_site_lists_the_sites():
    model = tiny("llama", batch=2, seq=8).model
    ids = torch.randint(3, 100, (2, 8))
    cfg = attnopt.Config(overrides={"layers.0.*": attnopt.Fused()})  # no leading "model."
    with pytest.raises(attnopt.ConfigError, match="'layers.0.\\*' matches no attention site") as e:
        attnopt.optimize(model, {"input_ids": ids}, cfg)
    assert "model.layers.0.self_attn" in str(e.value)


def test_hf_spec_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(attnopt.ConfigError, match="hf:/nonexistent"):
        build("hf:/nonexistent")
    with pytest.raises(attnopt.ConfigError, match="local directory"):
        build(f"hf:{tmp_path}")  # exists, but holds no model


def test_factory_spec_refuses_batch_it_cannot_take(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        "import torch\n"
        "def fixed():\n    return torch.nn.Identity(), (torch.randn(2, 3),)\n"
        "def sized(batch=2, seq=4):\n    return torch.nn.Identity(), (torch.randn(batch, seq),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(attnopt.ConfigError, match="--batch cannot be applied"):
        build("my_factories:fixed", batch=4)
    assert build("my_factories:sized", batch=3, seq=5).inputs[0].shape == (3, 5)
    assert build("my_factories:fixed").inputs[0].shape == (2, 3)


def test_failed_capture_prints_nothing_but_the_error(capfd):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.softmax(-1) if x.sum() > 0 else x

    with pytest.raises(attnopt.CaptureError):
        attnopt.optimize(DataDependent(), (torch.randn(2, 4),))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err, "torch's graph dump must stay behind --verbose"
    assert "symbolic_shapes" not in err


def test_export_is_quiet_and_leaves_the_users_settings_alone(capfd, tmp_path):
    import logging

    model = CausalTrilBuffer().eval()
    x = (torch.randn(2, 12, 32),)
    level = logging.getLogger("torch").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = attnopt.optimize(model, x, attnopt.Config(dynamic=False))
        attnopt.export_onnx(fast, x, tmp_path / "m.onnx", dynamic=False)
    out, err = capfd.readouterr()
    assert "torchvision" not in err and "Skipping constant folding" not in err
    assert "Evaluation failed" not in err
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert logging.getLogger("torch").level == level
    # outside attnopt's calls the user's warning filters apply again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("isinstance(treespec, LeafSpec) is deprecated", FutureWarning, stacklevel=1)
    assert len(caught) == 1
