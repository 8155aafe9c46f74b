"""Linear attention (``attnopt.variants.linear``): config, math vs references, masks, fit, ONNX."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt
import attnopt.variants._feature_maps as fm
from attnopt.errors import ConfigError, VariantNotApplicableError
from attnopt.export._registry import ONNX_TARGETS, translation_table
from attnopt.variants import linear as lin
from attnopt.variants._base import SiteOperands, Variant, implementation
from attnopt.variants.linear import Linear, LinearImpl, MapParams

MAPS = fm.FEATURE_MAPS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small ops on shared 2-core machines: a second intra-op thread only waits for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
TOL = 2e-5  # fp32 implementation vs fp64 references (relative to the output's scale)


def _qkv(b=2, h=4, hkv=2, lq=21, lk=None, d=8, dv=None, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    q = torch.randn(b, h, lq, d, generator=gen) * spread
    k = torch.randn(b, hkv, lk, d, generator=gen) * spread
    v = torch.randn(b, hkv, lk, dv, generator=gen)
    return q, k, v


def _params(name: str, d: int, h: int = 4, hkv: int = 2, seed: int = 0,
            fitted: bool = False) -> MapParams:
    """The map as emitted; ``fitted`` adds random projections (as a fit would)."""
    p = lin.map_params(Linear(feature_map=name, seed=seed), d ** -0.5, d, None, h, hkv)
    if fitted:
        gen = torch.Generator().manual_seed(seed + 1)
        m = 6
        p = MapParams(name, p.scale,
                      torch.randn(h, d, m, generator=gen) / math.sqrt(d),
                      torch.randn(h, m, generator=gen) * 0.1,
                      torch.randn(hkv, d, m, generator=gen) / math.sqrt(d),
                      torch.randn(hkv, m, generator=gen) * 0.1,
                      fm.performer_omega(m, 4 * m, seed) if name == "performer" else None)
    return p


def _padding(b: int, lk: int, kind: str, seed: int = 0) -> torch.Tensor | None:
    """A key-padding mask: ``none``, ``bool`` (True = attend) or ``float`` (0 / -inf / min)."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(0, lk, (1,), generator=gen))   # at least one key stays
        keep[i, ..., lk - n:] = False
    if kind == "bool":
        return keep
    fill = torch.finfo(torch.float32).min if kind == "float-min" else float("-inf")
    return torch.zeros(b, 1, 1, lk).masked_fill(~keep, fill)


@contextmanager
def _chunks(small: bool):
    """With ``small``, the implementation walks the sequence one block (or token) per chunk."""
    with pytest.MonkeyPatch.context() as mp:
        if small:
            mp.setattr(lin, "CHUNK_BYTES", 1)
            mp.setattr(lin, "MIN_CHUNK", 1)
        yield


def _fast(q, k, v, mask, p, causal, block):
    kw = lin.key_weights(mask, q.shape[1], k.shape[1], k.shape[2])
    return lin.linear_attention_torch(q, k, v, kw, p, causal, block)


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAPS)
def test_config_round_trips(name):
    cfg = Linear(feature_map=name, block=32, features=12, seed=3, steps=5, lr=0.1)
    data = cfg.to_dict()
    assert data["variant"] == "linear"
    assert Variant.from_dict(data) == cfg
    assert isinstance(implementation(cfg), LinearImpl)


@pytest.mark.parametrize("kwargs", [
    {"feature_map": "softmax"}, {"block": 0}, {"block": 1.5}, {"block": True},
    {"features": 0}, {"steps": -1}, {"lr": 0.0}, {"seed": "x"},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        Linear(**kwargs)


# -- math: fast implementation vs references ----------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(MAPS),
    b=st.integers(1, 2),
    heads=st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 1)]),
    n=st.integers(1, 70),
    d=st.sampled_from([4, 8]),
    block=st.integers(1, 24),
    mask=st.sampled_from(["none", "bool", "float", "float-min"]),
    small_chunks=st.booleans(),
    fitted=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_causal_blockwise_equals_cumsum_and_quadratic(name, b, heads, n, d, block, mask,
                                                      small_chunks, fitted, seed):
    """Block-wise causal (any block, lengths not multiples of it, several chunks) = references."""
    h, hkv = heads
    q, k, v = _qkv(b, h, hkv, n, d=d, seed=seed)
    m = _padding(b, n, mask, seed)
    p = _params(name, d, h, hkv, seed, fitted)
    with _chunks(small_chunks):  # one block per chunk: the state carried between chunks
        out = _fast(q, k, v, m, p, True, block)
    quad = lin.reference_quadratic(q, k, v, m, p, is_causal=True)
    cums = lin.reference_cumsum(q, k, v, m, p)
    assert rel_err(quad, cums) < 1e-10
    assert rel_err(quad, out) < TOL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(MAPS),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    lq=st.integers(1, 40),
    lk=st.integers(1, 40),
    dv=st.sampled_from([4, 8, 5]),
    mask=st.sampled_from(["none", "bool", "float"]),
    small_chunks=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_non_causal_equals_quadratic(name, heads, lq, lk, dv, mask, small_chunks, seed):
    """Non-causal, self and cross attention (Lq != Lk), GQA, Dv != D, padding masks."""
    h, hkv = heads
    q, k, v = _qkv(2, h, hkv, lq, lk, d=8, dv=dv, seed=seed)
    m = _padding(2, lk, mask, seed)
    p = _params(name, 8, h, hkv, seed)
    with _chunks(small_chunks):
        out = _fast(q, k, v, m, p, False, 16)
    assert rel_err(lin.reference_quadratic(q, k, v, m, p), out) < TOL


@pytest.mark.parametrize("name", ["elu", "performer", "learned"])
def test_causal_is_stable_in_fp32_at_32k_tokens(name):
    """32768 tokens, fp32, block-wise: matches the fp64 cumsum recurrence."""
    q, k, v = _qkv(1, 1, 1, 32768, d=8, seed=1, spread=2.0)
    p = _params(name, 8, 1, 1)
    out = _fast(q, k, v, None, p, True, 64)
    assert torch.isfinite(out).all()
    assert rel_err(lin.reference_cumsum(q, k, v, None, p), out) < 1e-4


def test_block_size_does_not_change_the_result():
    q, k, v = _qkv(1, 4, 4, 300, d=16)
    p = _params("elu", 16, 4, 4)
    outs = [_fast(q, k, v, None, p, True, blk) for blk in (1, 7, 64, 512)]
    for o in outs[1:]:
        assert rel_err(outs[0], o) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_keeps_low_precision_dtype(dtype):
    q, k, v = _qkv(1, 2, 2, 33, d=8)
    p = _params("elu", 8, 2, 2)
    out = torch.ops.attnopt.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), None, None,
                                             None, None, None, None, True, 8 ** -0.5, "elu", 8)
    assert out.dtype == dtype
    ref = lin.reference_quadratic(q.to(dtype), k.to(dtype), v.to(dtype), None, p, True)
    assert rel_err(ref, out) < 1e-2


def test_performer_features_are_unbiased_and_converge_to_softmax():
    """E[φ(x)·φ(y)] = exp(x·y) (Haar-orthogonal blocks); many features → softmax attention."""
    omega = fm.performer_omega(8, 1 << 16, 0)
    assert abs(omega.mean().item()) < 0.01 and abs(omega.std().item() - 1) < 0.01
    q, k, v = _qkv(1, 2, 2, 32, d=8, seed=2, spread=0.5)
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = [rel_err(exact, _fast(q, k, v, None, MapParams(
        "performer", 8 ** -0.5, omega=fm.performer_omega(8, m, 0)), False, 64))
        for m in (8, 1 << 14)]
    assert errs[1] < 0.05 and errs[1] < errs[0] / 3


def test_taylor_matches_its_definition():
    """φ(q)·φ(k) = 1 + s q·k + (s q·k)² / 2."""
    q, k, _ = _qkv(1, 1, 1, 5, d=6)
    p = MapParams("taylor", 0.3)
    dots = fm.query_features(q, p) @ fm.key_features(k, p, None, None).transpose(-1, -2)
    x = 0.3 * q @ k.transpose(-1, -2)
    assert torch.allclose(dots, 1 + x + x * x / 2, atol=1e-5)
    assert p.feature_dim(6) == fm.query_features(q, p).shape[-1] == 1 + 6 + 21


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_masked_keys_are_excluded_from_numerator_and_normaliser(causal):
    """Batch row 1 has 7 padded keys: output equals the unpadded sequence's; padded v irrelevant."""
    q, k, v = _qkv(2, 4, 2, 30, d=8)
    m = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    m[1, ..., 23:] = False
    p = _params("performer", 8)
    out = _fast(q, k, v, m, p, causal, 8)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 23:] = 100.0
    v2[1, :, 23:] = 1e6
    assert rel_err(out, _fast(q, k2, v2, m, p, causal, 8)) < 1e-6
    short = _fast(q[1:, :, :23], k[1:, :, :23], v[1:, :, :23], None, p, causal, 8)
    assert rel_err(short, out[1:, :, :23]) < 1e-5


def test_float_key_bias_is_a_key_weight():
    """An additive key-only bias b_j multiplies φ(k_j) by exp(b_j) (softmax's factorisation)."""
    q, k, v = _qkv(1, 2, 2, 12, d=8)
    bias = torch.randn(1, 1, 1, 12)
    p = _params("elu", 8, 2, 2)
    out = _fast(q, k, v, bias, p, False, 4)
    fq = fm.query_features(q.double(), p)
    fk = fm.key_features(k.double(), p, None, None) * bias.double().exp().transpose(-1, -2)
    a = fq @ fk.transpose(-1, -2)
    assert rel_err((a @ v.double()) / a.sum(-1, keepdim=True), out) < 1e-5


@pytest.mark.parametrize("shape", [(2, 1, 5, 9), (2, 4, 1, 9)], ids=["per-query", "per-head-gqa"])
def test_query_dependent_masks_are_refused(shape):
    q, k, v = _qkv(2, 4, 2, 5, 9, d=8)
    with pytest.raises(VariantNotApplicableError, match="key-padding"):
        torch.ops.attnopt.linear_attention(q, k, v, torch.ones(shape, dtype=torch.bool), None,
                                           None, None, None, None, False, 0.3, "elu", 8)


def test_causal_cross_attention_is_refused_by_the_op():
    q, k, v = _qkv(1, 2, 2, 5, 9, d=8)
    with pytest.raises(VariantNotApplicableError, match="Lq == Lk"):
        _fast(q, k, v, None, _params("elu", 8, 2, 2), True, 4)


def _site(**changes) -> attnopt.AttentionSite:
    base = dict(index=0, location="layer.0", module_type="Attn", spelling="sdpa",
                already_fused=True, kind="self", batch=2, heads=4, kv_heads=2, q_len=128,
                kv_len=128, head_dim=64, value_dim=64, dynamic=(), scale=0.125, causal=False,
                window=None, mask="padding", dtype="float32")
    fields = {**base, **changes}
    fields.setdefault("mask_kinds", tuple(k for k in fields["mask"].split("+") if k != "none"))
    return attnopt.AttentionSite(**fields)


@pytest.mark.parametrize("changes, reason", [
    ({"mask": "bias"}, "key-padding"),
    ({"mask": "padding+mask"}, "key-padding"),
    ({"mask": "causal window=16", "window": 16, "causal": True}, "window"),
    ({"causal": True, "kind": "cross", "kv_len": 50, "mask": "causal"}, "cross attention"),
    ({"fusable": False, "reason": "weights returned"}, "weights returned"),
], ids=["bias", "mask", "window", "causal-cross", "not-fusable"])
def test_can_apply_refuses_with_a_reason(changes, reason):
    assert reason in LinearImpl().can_apply(Linear(), _site(**changes))


@pytest.mark.parametrize("changes", [{}, {"mask": "none"}, {"mask": "causal+padding",
                                                             "causal": True},
                                     {"kind": "cross", "kv_len": 50}])
def test_can_apply_accepts_padding_causal_and_cross(changes):
    assert LinearImpl().can_apply(Linear(), _site(**changes)) is None


def test_can_apply_refuses_a_too_large_taylor_state():
    reason = LinearImpl().can_apply(Linear(feature_map="taylor"), _site(head_dim=256,
                                                                        value_dim=256))
    assert "too large" in reason
    assert LinearImpl().can_apply(Linear(feature_map="taylor", features=16),
                                  _site(head_dim=256, value_dim=256)) is None


def test_density_is_a_cost_ratio_that_falls_with_length():
    impl, cfg = LinearImpl(), Linear()
    short = impl.density(cfg, _site(q_len=128, kv_len=128))
    long = impl.density(cfg, _site(q_len=16384, kv_len=16384))
    causal = impl.density(cfg, _site(q_len=16384, kv_len=16384, causal=True))
    assert long < short <= 1.0 and long < 0.02 and causal < 0.05


# -- fit (attention transfer) ----------------------------------------------------------------------


def _samples(causal: bool, n: int = 2, gqa: bool = True, mask: bool = True):
    """Calibration samples from peaked softmax attention (what linear maps approximate badly)."""
    out = []
    for i in range(n):
        q, k, v = _qkv(2, 4, 2 if gqa else 4, 24, d=8, seed=10 + i, spread=1.6)
        m = _padding(2, 24, "bool", i) if mask and not causal else None
        full = m if m is None else m.expand(2, 4, 24, 24)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=full, is_causal=causal,
                                           scale=8 ** -0.5, enable_gqa=gqa)
        out.append({"q": q, "k": k, "v": v, "mask": m, "causal": causal, "scale": 8 ** -0.5,
                    "out": o})
    return out


@pytest.mark.parametrize("name, causal", [("learned", False), ("learned", True),
                                          ("elu", False), ("taylor", True), ("performer", True)])
def test_fit_reduces_the_output_error(name, causal):
    cfg = Linear(feature_map=name, steps=30, lr=2e-2, features=4 if name == "taylor" else None)
    samples = _samples(causal)
    state = LinearImpl().fit(cfg, _site(causal=causal), samples)
    assert state.wq.shape == (4, 8, cfg.features or 8) and state.wk.shape[0] == 2
    assert state.loss_after < 0.8 * state.loss_before
    if cfg.features is not None:  # a smaller map than the unfitted one: not comparable
        return
    p = lin.map_params(cfg, 8 ** -0.5, 8, state)
    s = samples[0]
    fitted = _fast(s["q"], s["k"], s["v"], s["mask"], p, causal, cfg.block)
    unfitted = _fast(s["q"], s["k"], s["v"], s["mask"],
                     lin.map_params(cfg.__class__(feature_map=name), 8 ** -0.5, 8, None, 4, 2),
                     causal, cfg.block)
    assert fm.relative_mse(fitted, s["out"]) < fm.relative_mse(unfitted, s["out"])


def test_fit_without_samples_or_steps_returns_none():
    assert LinearImpl().fit(Linear(), _site(), []) is None
    assert LinearImpl().fit(Linear(steps=0), _site(), _samples(False)) is None


def test_emit_registers_fitted_tensors_and_calls_the_op():
    """``emit`` with a fitted state: buffers on the owning module, output = the fitted map's."""
    cfg = Linear(feature_map="learned", steps=10)
    samples = _samples(False, n=1)
    state = LinearImpl().fit(cfg, _site(), samples)
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    graph = gm.graph
    q, k, v, m = (graph.placeholder(n) for n in "qkvm")
    ops = SiteOperands(q=q, k=k, v=v, mask=m, causal=False, scale=8 ** -0.5, state=state)
    out = LinearImpl().emit(cfg, graph, ops, _site())
    graph.output(out)
    gm.recompile()
    assert out.target is torch.ops.attnopt.linear_attention.default
    assert any(name.startswith("attnopt_linear_0_wq") for name, _ in gm.named_buffers())
    s = samples[0]
    got = gm(s["q"], s["k"], s["v"], s["mask"])
    want = _fast(s["q"], s["k"], s["v"], s["mask"], lin.map_params(cfg, 8 ** -0.5, 8, state),
                 False, cfg.block)
    assert rel_err(want, got) < 1e-6
    # emitting again (the pipeline emits a check graph, then the rewrite) reuses the buffers
    LinearImpl().emit(cfg, graph, ops, _site())
    assert sum(n.startswith("attnopt_linear_0_wq") for n, _ in gm.named_buffers()) == 1


# -- pipeline and ONNX -----------------------------------------------------------------------------


class _EveryMap(torch.nn.Module):
    """Calls the op once per feature map, causal and non-causal, with a key-padding mask.

    One module (one export per target) keeps the ONNX tests fast; the bool mask is also passed
    as an additive float mask (0 / -inf) to the non-causal calls.
    """

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block
        self.maps = {name: _params(name, 8, fitted=name == "learned") for name in MAPS}
        for name, p in self.maps.items():
            for n in ("wq", "bq", "wk", "bk", "omega"):
                t = getattr(p, n)
                if t is None:  # not a None buffer: torch.export miscounts interleaved ones
                    setattr(self, f"{name}_{n}", None)
                else:
                    self.register_buffer(f"{name}_{n}", t.clone())

    def forward(self, q, k, v, mask):
        outs = []
        for name, p in self.maps.items():
            args = [getattr(self, f"{name}_{n}") for n in ("wq", "bq", "wk", "bk", "omega")]
            outs.append(torch.ops.attnopt.linear_attention(
                q, k, v, mask, *args, True, p.scale, name, self.block))
            outs.append(torch.ops.attnopt.linear_attention(
                q, k, v, mask.float().log(), *args, False, p.scale, name, self.block))
        return tuple(outs)


def _table(target):
    """The table export_onnx uses for ``target`` (TensorRT's depends on the TensorRT version)."""
    if target == "tensorrt":
        from attnopt.tensorrt import DEFAULT_VERSION, _lowerings

        return _lowerings.table(DEFAULT_VERSION)
    return translation_table(target)


@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_onnx_export_of_every_map_matches_torch_at_two_lengths(target, tmp_path):
    """Dynamic batch and sequence; 21 tokens (not a multiple of the block) and 64 tokens."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    module = _EveryMap(block=8).eval()

    def inputs(n, seed):
        q, k, v = _qkv(2, 4, 2, n, d=8, seed=seed)
        m = torch.ones(2, 1, 1, n, dtype=torch.bool)
        m[1, ..., n - 3:] = False
        return q, k, v, m

    seq = torch.export.Dim("seq", min=2, max=4096)
    batch = torch.export.Dim("batch", min=1, max=64)
    dyn = ({0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 3: seq})
    ep = torch.export.export(module, inputs(21, 0), dynamic_shapes=dyn)
    program = torch.onnx.export(ep, dynamo=True, opset_version=23, verbose=False, optimize=False,
                                custom_translation_table=_table(target))
    path = tmp_path / f"linear_{target}.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "CumSum" in ops and not any(o.startswith("linear") for o in ops)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in sess.get_inputs()]
    labels = [f"{name}-{'causal' if c else 'full'}" for name in MAPS for c in (True, False)]
    for n, seed in ((21, 1), (64, 2)):
        x = inputs(n, seed)
        want = module(*x)
        got = sess.run(None, dict(zip(feeds, (t.numpy() for t in x))))
        errs = {lab: float(np.abs(g - w.numpy()).max() / np.abs(w.numpy()).max())
                for lab, w, g in zip(labels, want, got)}
        assert max(errs.values()) < 1e-5, errs


def test_optimize_rewrites_a_gqa_decoder_with_padding():
    """End to end through ``attnopt.optimize`` (tiny Llama: causal + padding, GQA 4/2)."""
    from attnopt.models import build

    built = build("tiny:llama")
    fast = attnopt.optimize(built.model, built.inputs, attnopt.Config(variant=Linear()))
    rows = fast.report.rows
    assert [r.outcome for r in rows] == ["rewritten"] * built.expected_sites, fast.report.table()
    assert all(r.error is not None and r.error.cosine > 0.95 for r in rows)
    targets = [n.target for n in fast.exported_program().graph.nodes]
    assert targets.count(torch.ops.attnopt.linear_attention.default) == len(rows)
