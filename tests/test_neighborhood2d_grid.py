"""Neighborhood2D on real HF vision transformers without a hand-given grid.

The image size stays dynamic in the capture, so the patch grid is inferred symbolically and read
at run time: the optimized model must equal the same HF model whose attention is the dense-masked
reference (registered through HF's attention interface, independent of attnopt's rewrite) at
the example resolution and at another one.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import attnopt
import attnopt.variants.neighborhood2d as nbh
from attnopt.report import FUSED, REWRITTEN, unapplied_variants

transformers = pytest.importorskip("transformers")

PATCH = 8
KERNEL = 3
_GRID: dict[str, tuple[int, int]] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """HF attention-interface function: the dense-masked neighborhood reference."""
    out = nbh.reference_neighborhood2d(query, key, value, attention_mask, KERNEL, 1,
                                       _GRID["grid"], scaling)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("attnopt_n2d_reference", _reference_attention)

_COMMON = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=PATCH)


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(**_COMMON))


def _deit():  # class + distillation tokens
    return transformers.DeiTModel(transformers.DeiTConfig(**_COMMON))


def _beit():  # the relative position bias is a float mask, applied inside the pattern
    return transformers.BeitModel(transformers.BeitConfig(**_COMMON,
                                                          use_relative_position_bias=True))


def _dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(**_COMMON))


def _dinov2_registers():  # class + 4 register tokens
    cls = getattr(transformers, "Dinov2WithRegistersModel", None)
    if cls is None:
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    return cls(transformers.Dinov2WithRegistersConfig(**_COMMON, num_register_tokens=4))


# (model, extra inputs, example (H, W), another (H, W)); ViT / DeiT / BEiT resize their position
# embeddings only when asked to. Dinov2WithRegistersModel and BEiT's relative position bias call
# int() on the grid size while resizing, so torch.export specialises their grid (the captured
# model itself is valid for one grid only): their second size keeps the 5 x 6 grid.
MODELS = {
    "vit": (_vit, {"interpolate_pos_encoding": True}, (40, 48), (56, 32)),
    "deit": (_deit, {"interpolate_pos_encoding": True}, (40, 48), (32, 56)),
    "beit": (_beit, {"interpolate_pos_encoding": True}, (40, 48), (47, 55)),
    "dinov2": (_dinov2, {}, (40, 48), (56, 32)),
    "dinov2_registers": (_dinov2_registers, {}, (40, 48), (47, 55)),
}


def _inputs(hw: tuple[int, int], extra: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(2, 3, *hw, generator=gen), **extra}


def _rel(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _calls(fast) -> list:
    return [n for n in fast.graph_module.graph.nodes
            if n.target == torch.ops.attnopt.neighborhood2d.default]


def _with_attention(model, name: str, inputs: dict, grid: tuple[int, int]) -> torch.Tensor:
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    _GRID["grid"] = grid
    try:
        with torch.no_grad():
            return model(**inputs).last_hidden_state
    finally:
        model.set_attn_implementation(old)


@pytest.mark.parametrize("name", list(MODELS))
def test_grid_is_inferred_and_read_at_run_time(name):
    factory, extra, example, other = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    fast = attnopt.optimize(model, _inputs(example, extra, 0),
                            attnopt.Config(variant=nbh.Neighborhood2D(kernel=KERNEL)))
    assert [r.outcome for r in fast.report.rows] == [REWRITTEN], fast.report.table()
    assert not fast.report.warnings
    (call,) = _calls(fast)
    # the grid is a runtime size: dims 2, 3 of the patch embedding's output, not a constant
    gh, gw = call.args[6:8]
    assert all(isinstance(a, torch.fx.Node) and a.target == torch.ops.aten.sym_size.int
               and a.args[0].target == torch.ops.aten.conv2d.default for a in (gh, gw))
    assert (gh.args[1], gw.args[1]) == (2, 3)
    for seed, hw in enumerate((example, other), start=1):
        x = _inputs(hw, extra, seed)
        grid = (hw[0] // PATCH, hw[1] // PATCH)
        ref = _with_attention(model, "attnopt_n2d_reference", x, grid)
        exact = _with_attention(model, "eager", x, grid)
        with torch.no_grad():
            out = fast(**x).last_hidden_state
        assert _rel(ref, out) < 1e-5, (name, hw, _rel(ref, out))
        assert _rel(ref, exact) > 1e-4, "the pattern must change the output at this size"


class _UnfoldViT(torch.nn.Module):
    """Patches by ``unfold`` + Linear: the grid shows only after the attention (a conv head)."""

    def __init__(self, p: int = 4, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.p, self.heads = p, heads
        self.embed = torch.nn.Linear(3 * p * p, dim)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        b, _, hh, ww = x.shape
        t = self.embed(torch.nn.functional.unfold(x, self.p, stride=self.p).transpose(1, 2))
        t = torch.cat([self.cls.expand(b, -1, -1), t], 1)
        q, k, v = self.qkv(t).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
        t = t + a.transpose(1, 2).flatten(2)
        return self.head(t[:, 1:].transpose(1, 2).reshape(b, -1, hh // self.p, ww // self.p))


def test_grid_known_only_after_the_attention_specialises_the_capture(caplog):
    torch.manual_seed(0)
    model = _UnfoldViT().eval()
    x = torch.randn(2, 3, 24, 28)
    with caplog.at_level(logging.WARNING, logger="attnopt"):
        fast = attnopt.optimize(model, (x,), attnopt.Config(variant=nbh.Neighborhood2D(kernel=3)))
    (row,) = fast.report.rows
    assert row.outcome == REWRITTEN, fast.report.table()
    assert any("captured again with static shapes" in n for n in fast.report.notes)
    assert "captured again with static shapes" in fast.report.table()
    assert "capturing again with static shapes" in caplog.text
    (call,) = _calls(fast)
    assert call.args[6:8] == (6, 7)
    q = torch.randn(2, 2, 43, 8)
    assert torch.allclose(  # the static op call computes the pattern of the 6 x 7 grid
        nbh.neighborhood2d(q, q, q, None, 3, 1, 6, 7, 0.3),
        nbh.reference_neighborhood2d(q, q, q, None, 3, 1, (6, 7), 0.3), atol=1e-5)


def test_a_variant_applied_to_no_site_is_loud(caplog):
    from attnopt.models import build

    built = build("tiny:bert")
    with caplog.at_level(logging.WARNING, logger="attnopt"):
        fast = attnopt.optimize(built.model, built.inputs,
                                attnopt.Config(variant=nbh.Neighborhood2D(kernel=3)))
    n = len(fast.report.rows)
    assert n >= 1 and fast.report.count(FUSED) == n
    (line,) = fast.report.warnings
    assert line.startswith(f"Neighborhood2D(kernel=3) applied to 0 of {n} sites: cannot find "
                           "the token grid"), line
    assert line in caplog.text
    assert f"warning: {line}" in fast.report.table()
    assert fast.report.to_dict()["warnings"] == [line]
    # the default exact fusion is no request: nothing to warn about
    assert unapplied_variants(fast.report, lambda location: attnopt.Fused()) == []
    # strict mode: the same request is an error naming the site and the reason, not a warning
    with pytest.raises(attnopt.VariantNotApplicableError, match="cannot find the token grid"):
        attnopt.optimize(built.model, built.inputs,
                         attnopt.Config(variant=nbh.Neighborhood2D(kernel=3), strict=True))


# -- ONNX ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_n2d():
    torch.manual_seed(0)
    model = _dinov2().eval()
    return attnopt.optimize(model, _inputs((40, 48), {}, 0),
                            attnopt.Config(variant=nbh.Neighborhood2D(kernel=KERNEL)))


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
def test_dynamic_resolution_model_exports_and_runs_at_another_grid(target, dinov2_n2d, tmp_path):
    pytest.importorskip("onnxruntime")
    fast = dinov2_n2d
    res = attnopt.export_onnx(fast, _inputs((40, 48), {}, 0), tmp_path / "n2d.onnx",
                              target=target)
    sess = res.session(providers=["CPUExecutionProvider"])
    for seed, hw in enumerate(((56, 32), (72, 64)), start=1):  # 7 x 4 and 9 x 8 grids
        x = _inputs(hw, {}, seed)
        with torch.no_grad():
            want = fast(**x).last_hidden_state.numpy()
        got = sess.run(None, res.feed(x))[0]
        assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-5, (target, hw)


# -- grid sources other than a patch-embedding convolution -----------------------------------


class _UnshuffleViT(torch.nn.Module):
    """Patches by ``pixel_unshuffle`` (no convolution), an optional position embedding resized
    to the patch grid, a class token, one attention."""

    def __init__(self, resize_pos: bool):
        super().__init__()
        self.resize_pos = resize_pos
        self.pos = torch.nn.Parameter(torch.randn(1, 3 * PATCH * PATCH, 4, 4))
        self.embed = torch.nn.Linear(3 * PATCH * PATCH, 32)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 32))
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, img):
        x = torch.nn.functional.pixel_unshuffle(img, PATCH)              # [B, C p², h, w]
        if self.resize_pos:
            x = x + torch.nn.functional.interpolate(self.pos, size=x.shape[-2:], mode="bicubic")
        x = self.embed(x.flatten(2).transpose(1, 2))                     # [B, h·w, 32]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        q, k, v = self.qkv(x).reshape(x.shape[0], -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
        return (a @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("resize_pos,found", [(True, "position-embedding resize"),
                                              (False, "grid reshape")])
def test_grid_from_a_resize_or_a_reshape(resize_pos, found):
    from attnopt._match.grid import find_grid

    torch.manual_seed(0)
    model = _UnshuffleViT(resize_pos).eval()
    img = torch.randn(2, 3, 40, 48)                                      # a 5 x 6 grid
    (site,) = attnopt.find_attention(model, (img,))
    search = find_grid(site.graph.anchor)
    assert search.grid is not None, search.reason
    assert (search.grid.size, search.grid.prefix, search.grid.found) == ((5, 6), 1, found)
    assert search.grid.dynamic                     # read at run time: other sizes work too
    fast = attnopt.optimize(model, (img,), attnopt.Config(variant=nbh.Neighborhood2D(kernel=3)))
    assert fast.report.count(REWRITTEN) == 1
    other = torch.randn(1, 3, 56, 32)                                    # a 7 x 4 grid
    with torch.no_grad():
        got = fast(other)
        x = torch.nn.functional.pixel_unshuffle(other, PATCH)
        if resize_pos:
            x = x + torch.nn.functional.interpolate(model.pos, size=(7, 4), mode="bicubic")
        x = model.embed(x.flatten(2).transpose(1, 2))
        x = torch.cat([model.cls.expand(1, -1, -1), x], 1)
        q, k, v = model.qkv(x).reshape(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        want = nbh.reference_neighborhood2d(q, k, v, None, 3, 1, (7, 4), 0.25)
    assert torch.allclose(got, want.transpose(1, 2).flatten(2), atol=1e-5)
