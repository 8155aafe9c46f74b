"""The optimized model as a drop-in: call forms, constants, guards, dtype moves, save / load,
strict mode, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from zoo import CausalTrilBuffer, MulScale

import attnopt
from attnopt.models import tiny


@pytest.fixture(scope="module")
def llama():
    built = tiny("llama", batch=2, seq=12)
    return built, attnopt.optimize(built.model, built.inputs)


class WithOptions(nn.Module):
    """Attention with an optional mask, a flag and a scale factor (all with defaults)."""

    def __init__(self, e: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(e, 3 * e)
        self.o = nn.Linear(e, e)

    def forward(self, x, mask=None, flag: bool = False, factor: float = 1.0):
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * (e // self.h) ** -0.5
        if mask is not None:
            s = s + mask
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, e) * factor
        return self.o(y) + (1.0 if flag else 0.0)


# -- 1. call it like the original ------------------------------------------------------------


def test_hf_model_takes_positional_and_keyword_calls(llama):
    built, fast = llama
    ids, am = built.inputs["input_ids"], built.inputs["attention_mask"]
    with torch.no_grad():
        ref = built.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        for out in (fast(input_ids=ids, attention_mask=am), fast(ids, am),
                    fast(ids, attention_mask=am, use_cache=False),
                    fast(attention_mask=am, input_ids=ids, output_attentions=None)):
            assert torch.allclose(out.logits, ref, atol=1e-5)


def test_constants_are_listed_and_other_values_raise_a_typed_error(llama):
    built, fast = llama
    ids, am = built.inputs["input_ids"], built.inputs["attention_mask"]
    assert fast.constants == {"use_cache": False}
    assert any("use_cache=False" in n and "constant" in n for n in fast.report.notes)
    with pytest.raises(attnopt.CallError, match="'use_cache' was captured as the constant") as e:
        fast(ids, am, use_cache=True)
    assert e.value.argument == "use_cache"
    with pytest.raises(attnopt.CallError, match="'output_attentions' was not in the example"):
        fast(ids, am, output_attentions=True)
    with pytest.raises(attnopt.CallError, match="'attention_mask' was captured as a tensor"):
        fast(input_ids=ids)
    with pytest.raises(attnopt.CallError, match="input_ids.*torch.int64.*float32"):
        fast(ids.float(), am)
    with pytest.raises(attnopt.CallError, match="takes the original forward's arguments"):
        fast(ids, am, input_ids=ids)


def test_optional_arguments_and_defaults():
    model = WithOptions().eval()
    x = torch.randn(2, 10, 32)
    fast = attnopt.optimize(model, (x,))  # mask, flag and factor left to their defaults
    with torch.no_grad():
        ref = model(x)
        for out in (fast(x), fast(x=x), fast(x, None), fast(x, flag=False, factor=1.0)):
            assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(attnopt.CallError, match="'factor' was not in the example inputs"):
        fast(x, factor=2.0)
    mask = torch.zeros(2, 1, 1, 10)
    fast2 = attnopt.optimize(model, {"x": x, "mask": mask, "flag": True})
    assert fast2.constants == {"flag": True}
    with torch.no_grad():
        assert torch.allclose(fast2(x, mask, True), model(x, mask, True), atol=1e-5)
        assert torch.allclose(fast2(x, mask=mask, flag=True), model(x, mask, True), atol=1e-5)
    with pytest.raises(attnopt.CallError, match="'flag' was captured as the constant True"):
        fast2(x, mask)


def test_shape_outside_the_captured_graph_is_a_typed_error():
    model = MulScale().eval()
    x = torch.randn(2, 16, 32)
    fast = attnopt.optimize(model, (x,), attnopt.Config(dynamic=False))
    with pytest.raises(attnopt.CallError, match="outside what the graph was captured for"):
        fast(torch.randn(3, 16, 32))


@pytest.mark.parametrize("move", ["half", "bfloat16", "double"])
def test_dtype_moves_are_verified(move):
    model = CausalTrilBuffer().eval()
    x = torch.randn(2, 16, 32)
    fast = attnopt.optimize(model, (x,))
    moved = getattr(fast, move)()
    assert moved is fast
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[move]
    assert next(fast.parameters()).dtype == dtype
    key = next(k for k in fast.report.end_to_end if "after .to" in k)
    tol = max(attnopt.verify.default_tolerance(dtype), 1e-4)
    assert fast.report.end_to_end[key].rel < tol
    with torch.no_grad():
        out = fast(x.to(dtype))
    assert out.dtype == dtype
    assert (out.float() - model(x)).abs().max() / model(x).abs().max() < 3e-2


def test_dtype_move_a_graph_cannot_take_raises_and_leaves_the_model_unchanged(llama):
    built, fast = llama
    # HF's RMSNorm casts to the capture's dtype inside the graph: bf16 weights meet fp32.
    with pytest.raises(attnopt.ConfigError, match="cannot run in torch.bfloat16"):
        fast.to(torch.bfloat16)
    assert next(fast.parameters()).dtype == torch.float32
    fast.to("cpu")  # same device and dtype: nothing to verify
    with torch.no_grad():
        fast(**{k: v for k, v in built.inputs.items()})


# -- 2. save / load ---------------------------------------------------------------------------


def _same_outputs(a, b, *args, **kwargs):
    with torch.no_grad():
        x, y = a(*args, **kwargs), b(*args, **kwargs)
    x = x.logits if hasattr(x, "logits") else x
    y = y.logits if hasattr(y, "logits") else y
    return torch.equal(x, y)


def test_save_load_exact_hf_model(llama, tmp_path):
    built, fast = llama
    path = attnopt.save(fast, tmp_path / "llama.pt2")
    back = attnopt.load(path)
    assert back.report.to_dict() == fast.report.to_dict()
    assert str(back.report) == str(fast.report)
    assert back.config == fast.config and back.constants == fast.constants
    assert _same_outputs(fast, back, **built.inputs)
    ids, am = built.inputs["input_ids"][:, :9], built.inputs["attention_mask"][:, :9]
    assert _same_outputs(fast, back, ids, am)  # another length: still dynamic
    with pytest.raises(attnopt.CallError, match="use_cache"):
        back(ids, am, use_cache=True)
    assert [p.name for p in tmp_path.iterdir()] == ["llama.pt2"]  # no temporary left


@pytest.mark.parametrize("variant", [
    attnopt.SlidingWindow(window=4),
    attnopt.Linear(feature_map="learned", steps=5),
], ids=["sliding_window", "linear_learned"])
def test_save_load_approximate_variants(variant, tmp_path):
    model = CausalTrilBuffer().eval()
    x = torch.randn(2, 16, 32)
    fast = attnopt.optimize(model, (x,), attnopt.Config(variant=variant))
    assert fast.report.count("rewritten") == 1
    back = attnopt.load(attnopt.save(fast, tmp_path / "m.pt2"))
    assert back.report.to_dict() == fast.report.to_dict()
    assert _same_outputs(fast, back, x)
    assert _same_outputs(fast, back, torch.randn(3, 11, 32))


def test_save_load_errors(llama, tmp_path):
    _, fast = llama
    with pytest.raises(attnopt.ConfigError, match="does not exist"):
        attnopt.save(fast, tmp_path / "missing" / "m.pt2")
    with pytest.raises(attnopt.ConfigError, match="is a directory"):
        attnopt.save(fast, tmp_path)
    with pytest.raises(attnopt.ConfigError, match="takes what attnopt.optimize returned"):
        attnopt.save(nn.Linear(2, 2), tmp_path / "m.pt2")
    with pytest.raises(attnopt.ConfigError, match="does not exist"):
        attnopt.load(tmp_path / "nope.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a zip")
    with pytest.raises(attnopt.ConfigError, match="not an attnopt archive"):
        attnopt.load(junk)
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)), plain)
    with pytest.raises(attnopt.ConfigError, match="not an attnopt one"):
        attnopt.load(plain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt2", "plain.pt2"]


# -- 7. strict mode ---------------------------------------------------------------------------


def test_strict_mode_raises_for_a_forced_variant_that_cannot_apply():
    model = MulScale().eval()  # not causal: Streaming needs causal attention
    x = torch.randn(2, 16, 32)
    streaming = attnopt.Streaming(sinks=2, window=4)
    lenient = attnopt.optimize(model, (x,), attnopt.Config(variant=streaming))
    row = lenient.report.rows[0]
    assert row.outcome == "fused" and "not applied" in row.note
    with pytest.raises(attnopt.VariantNotApplicableError, match="Streaming.*site 0"):
        attnopt.optimize(model, (x,), attnopt.Config(variant=streaming, strict=True))
    site = lenient.sites[0]
    assert streaming.can_apply(site) is not None
    assert attnopt.Fused().can_apply(site, raise_error=True) is None
    # the default exact fusion is not "forced": strict changes nothing there
    strict = attnopt.optimize(model, (x,), attnopt.Config(strict=True))
    assert strict.report.count("fused") == 1


# -- 3. torch.compile -------------------------------------------------------------------------


def test_torch_compile_with_and_without_grad():
    model = CausalTrilBuffer().eval()
    x = torch.randn(2, 16, 32)
    fast = attnopt.optimize(model, (x,))
    compiled = torch.compile(fast, dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n.removeprefix("graph_module."): p.grad for n, p in fast.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for n, p in model.named_parameters():  # k.bias has a zero gradient: errors vs the largest
        err = (grads[n] - p.grad).abs().max().item() / scale
        assert err < 1e-5, (n, err)
