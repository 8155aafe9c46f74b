"""CUDA paths: SDPA backends of the fused op, FlexAttention sparse variants, linear, end to end.

Every test here needs a CUDA GPU and is skipped with that reason without one (run them with
``pytest -m gpu``; ``scripts/gpu_check.sh`` does, on the borrowed machine).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import attnopt
import attnopt.variants.block_topk as btk
import attnopt.variants.linear as lin
import attnopt.variants.neighborhood2d as nbh
import attnopt.variants.sliding_window as swa
import attnopt.variants.streaming as stm
from attnopt.models import tiny
from attnopt.report import FUSED, REWRITTEN
from attnopt.variants import _backends, _flex
from attnopt.variants.fused import reference_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)"),
]

DEV = "cuda"
BF16_TOL = 2e-2  # bf16 inputs and output vs a float reference, relative to the output's scale


def _qkv(b=1, h=8, hkv=8, lq=1024, lk=None, d=128, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(0)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, lk, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, lk, d, device=DEV, dtype=dtype, generator=g)
    return q, k, v


# -- fused: which SDPA kernel each kind of site reaches --

FUSED_CASES = {
    # name: (kv heads, mask kind, causal, backends that are acceptable)
    "causal": (8, None, True, {"flash", "cudnn"}),
    "causal-gqa": (2, None, True, {"flash", "cudnn"}),
    "bidirectional": (8, None, False, {"flash", "cudnn"}),
    "no-op-padding-mask": (8, "all-true", False, {"flash", "cudnn"}),
    "causal-no-op-padding-mask": (2, "all-true", True, {"flash", "cudnn"}),
    "padding-mask": (8, "padding", False, {"efficient", "cudnn"}),
    "padding-mask-gqa": (2, "padding", False, {"efficient", "cudnn"}),
    "causal-padding-mask-gqa": (2, "padding", True, {"efficient", "cudnn"}),
    "fp32-gqa": (2, None, True, {"efficient", "cudnn"}),
}


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_op_reaches_a_fused_kernel(name):
    hkv, mask_kind, causal, ok = FUSED_CASES[name]
    dtype = torch.float32 if name.startswith("fp32") else torch.bfloat16
    q, k, v = _qkv(hkv=hkv, lq=1000, dtype=dtype)
    mask = None
    if mask_kind is not None:
        mask = torch.ones(1, 1, 1, 1000, dtype=torch.bool, device=DEV)
        if mask_kind == "padding":
            mask[..., 900:] = False
    scale = q.shape[-1] ** -0.5
    out, names = _backends.sdpa_backends(torch.ops.attnopt.attention, q, k, v, mask, causal,
                                         scale)
    print(f"{name}: {names} available={_backends.available_backends(q, k, v, mask, causal)}")
    assert names and names[0] in ok, (name, names)
    cpu = [x.cpu() for x in (q, k, v)]
    want = reference_attention(*cpu, None if mask is None else mask.cpu(), causal, scale)
    assert rel_err(want, out.cpu()) < BF16_TOL


# -- sparse variants: FlexAttention on CUDA --

GRID = (32, 32)
SPARSE = {
    "sliding_window": (torch.ops.attnopt.sliding_window, swa.reference_sliding_window,
                       (128, True)),
    "streaming": (torch.ops.attnopt.streaming, stm.reference_streaming, (4, 124)),
    "block_topk": (torch.ops.attnopt.block_topk, btk.reference_block_topk,
                   (128, 2, True, True)),
    "block_topk-64": (torch.ops.attnopt.block_topk, btk.reference_block_topk,
                      (64, 3, False, True)),
    "neighborhood2d": (torch.ops.attnopt.neighborhood2d, nbh.reference_neighborhood2d,
                       (7, 1, *GRID)),
}


# every variant with a padding mask (score_mod) and one without: each case is one compile
@pytest.mark.parametrize("name,masked", [(n, True) for n in SPARSE] + [("sliding_window", False)],
                         ids=[f"{n}-padmask" for n in SPARSE] + ["sliding_window-nomask"])
def test_sparse_variant_runs_flex_on_cuda(name, masked):
    op, ref, args = SPARSE[name]
    length = 1 + GRID[0] * GRID[1] if name == "neighborhood2d" else 1500
    q, k, v = _qkv(h=8, hkv=2, lq=length, d=64)
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device=DEV)
        mask[..., length - 100:] = False
    scale = q.shape[-1] ** -0.5
    _flex._warned.clear()
    out = op(q, k, v, mask, *args, scale)
    assert not _flex._warned, "the FlexAttention path failed and the blocked kernel ran"
    if name == "neighborhood2d":
        want = ref(q, k, v, mask, args[0], args[1], GRID, scale)
    else:
        want = ref(q, k, v, mask, *args, scale=scale)
    assert rel_err(want, out) < BF16_TOL


def test_flex_block_masks_are_cached_per_shape():
    q, k, v = _qkv(h=8, hkv=2, lq=1500, d=64)  # the shape of the nomask case above
    _flex._BLOCK_MASKS.clear()
    for _ in range(3):
        torch.ops.attnopt.sliding_window(q, k, v, None, 128, True, 0.125)
    assert len(_flex._BLOCK_MASKS) == 1


# -- linear --


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_on_cuda_matches_cpu_and_reference(causal):
    q, k, v = _qkv(h=8, hkv=2, lq=1000, d=64, dtype=torch.float32)
    scale = q.shape[-1] ** -0.5
    args = (None, None, None, None, None, causal, scale, "elu", 64)
    out = torch.ops.attnopt.linear_attention(q, k, v, None, *args)
    cpu = torch.ops.attnopt.linear_attention(q.cpu(), k.cpu(), v.cpu(), None, *args)
    assert rel_err(cpu, out.cpu()) < 1e-4
    p = lin.MapParams("elu", scale, None, None, None, None, None)
    want = lin.reference_quadratic(q.cpu(), k.cpu(), v.cpu(), None, p, is_causal=causal)
    assert rel_err(want, out.cpu()) < 1e-3


def test_linear_on_cuda_bf16_uses_tf32_within_bf16_error():
    q, k, v = _qkv(h=8, hkv=2, lq=1000, d=64)
    scale = q.shape[-1] ** -0.5
    before = torch.backends.cuda.matmul.allow_tf32
    out = torch.ops.attnopt.linear_attention(q, k, v, None, None, None, None, None, None, True,
                                             scale, "elu", 64)
    assert torch.backends.cuda.matmul.allow_tf32 == before, "TF32 setting not restored"
    p = lin.MapParams("elu", scale, None, None, None, None, None)
    want = lin.reference_quadratic(q.cpu().float(), k.cpu().float(), v.cpu().float(), None, p,
                                   is_causal=True)
    assert out.dtype == torch.bfloat16 and rel_err(want, out.cpu()) < BF16_TOL


# -- end to end --


def _on_cuda(built):
    model = built.model.to(DEV).eval()
    inputs = {n: t.to(DEV) if isinstance(t, torch.Tensor) else t
              for n, t in built.inputs.items()}
    return model, inputs


def test_optimize_tiny_llama_on_cuda_fused():
    model, inputs = _on_cuda(tiny("llama-eager", batch=2, seq=64))
    fast = attnopt.optimize(model, inputs)
    assert fast.report.count(FUSED) == len(fast.report.rows) > 0, fast.report.table()
    with torch.no_grad():
        ref = model(**inputs, **fast.call_defaults)
        out = fast(**inputs)
    assert attnopt.verify.compare(ref, out).rel <= 1e-3


def test_optimize_tiny_llama_on_cuda_sliding_window():
    model, inputs = _on_cuda(tiny("llama-eager", batch=1, seq=300))
    fast = attnopt.optimize(model, inputs, attnopt.Config(variant=attnopt.SlidingWindow(
        window=64)))
    assert fast.report.count(REWRITTEN) == len(fast.report.rows) > 0, fast.report.table()
    _flex._warned.clear()
    with torch.no_grad():
        fast(**inputs)
    assert not _flex._warned


def test_softcap_flex_on_cuda():
    q, k, v = _qkv(h=8, hkv=2, lq=1500, d=64)
    mask = torch.ones(1, 1, 1, 1500, dtype=torch.bool, device=DEV)
    mask[..., 1400:] = False
    scale, cap = 0.125, 5.0
    out = _flex.softcap_attention(q, k, v, mask, True, scale, cap)
    rep = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(-2, -1)) * scale
    s = (cap * torch.tanh(s / cap)).masked_fill(~mask, float("-inf"))
    s = s.masked_fill(~torch.ones(1500, 1500, dtype=torch.bool, device=DEV).tril(),
                      float("-inf"))
    want = s.softmax(-1) @ v.double().repeat_interleave(rep, 1)
    assert rel_err(want, out) < BF16_TOL
    # the op itself takes the FlexAttention path on CUDA (the CPU loop would be far slower)
    via_op = torch.ops.attnopt.softcap_attention(q, k, v, mask, True, scale, cap)
    assert rel_err(want, via_op) < BF16_TOL and not _flex._warned


@pytest.mark.parametrize("variant", [
    attnopt.StreamingHeads(sinks=4, window=64, full_fraction=0.5),
    attnopt.StreamingHeads(sinks=4, window=64, full_fraction=0.5, ranking="output"),
    attnopt.GroupKV(groups=1),
    attnopt.PruneHeads(fraction=0.5),
], ids=["streaming_heads", "streaming_heads-output", "group_kv", "prune_heads"])
def test_head_variants_optimize_and_run_on_cuda(variant):
    # the head variants run the exact op (SDPA) and, for streaming heads, the FlexAttention
    # streaming path on CUDA: calibration, rewrite and the model call stay on the device
    model, inputs = _on_cuda(tiny("llama-eager", batch=1, seq=300))
    fast = attnopt.optimize(model, inputs, attnopt.Config(variant=variant))
    assert fast.report.count(REWRITTEN) == len(fast.report.rows) > 0, fast.report.table()
    _flex._warned.clear()
    with torch.no_grad():
        out = fast(**inputs).logits
    assert out.is_cuda and torch.isfinite(out).all() and not _flex._warned
