"""Training through attnopt ops: every op of the registry has a backward, checked numerically.

``gradcheck`` (float64, small shapes) compares each op's analytical gradient with finite
differences of the op itself; a second check compares it with autograd through the op's dense
reference. The list of ops comes from the variant registry, so a new variant without a backward
(or without a case here) fails.
"""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.variants import _autograd
from attnopt.variants._feature_maps import MapParams
from attnopt.variants.block_topk import reference_block_topk
from attnopt.variants.fused import reference_attention
from attnopt.variants.group_kv import reference_group_kv
from attnopt.variants.linear import reference_quadratic
from attnopt.variants.neighborhood2d import reference_neighborhood2d
from attnopt.variants.prune_heads import reference_prune_heads
from attnopt.variants.sliding_window import reference_sliding_window
from attnopt.variants.softcap import reference_softcap_attention
from attnopt.variants.streaming import reference_streaming
from attnopt.variants.streaming_heads import reference_streaming_heads

B, H, HKV, D = 1, 2, 1, 4


def _qkv(lq: int, lk: int | None = None, dtype=torch.float64):
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, lk, D, generator=g, dtype=dtype)
    bias = 0.5 * torch.randn(B, 1, lq, lk, generator=g, dtype=dtype)  # a learnable bias
    return q, k, v, bias


def _key_bias(lk: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return 0.5 * torch.randn(B, 1, 1, lk, generator=g, dtype=dtype)


# Per op: tensors (grad checked), a call of the op on them, and its dense reference.
# Sequence lengths are not multiples of the block sizes on purpose.
def _case(name: str):
    if name == "attention":
        q, k, v, m = _qkv(7, 9)
        return ((q, k, v, m), lambda q, k, v, m: torch.ops.attnopt.attention(q, k, v, m, False,
                                                                             0.5),
                lambda q, k, v, m: reference_attention(q, k, v, m, False, 0.5), {})
    if name == "sliding_window":
        q, k, v, m = _qkv(11)
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.sliding_window(q, k, v, m, 3, True, 0.5),
                lambda q, k, v, m: reference_sliding_window(q, k, v, m, 3, True, 0.5), {})
    if name == "streaming":
        q, k, v, m = _qkv(11)
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.streaming(q, k, v, m, 2, 3, 0.5),
                lambda q, k, v, m: reference_streaming(q, k, v, m, 2, 3, 0.5), {})
    if name == "streaming_heads":
        q, k, v, m = _qkv(11)
        q = torch.cat([q, q.flip(-2)], dim=1)     # 4 query heads over 2 kv heads
        k, v = torch.cat([k, v], dim=1), torch.cat([v, k], dim=1)
        full = torch.tensor([True, False])        # one full head group, one streaming
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.streaming_heads(q, k, v, m, full, 1, 2, 3,
                                                                     0.5),
                lambda q, k, v, m: reference_streaming_heads(q, k, v, m, full, 2, 3, 0.5), {})
    if name == "group_kv":
        q, k, v, m = _qkv(7, 9)
        q = torch.cat([q, q.flip(-2)], dim=1)     # 4 query heads over 2 kv heads, pooled to 1
        k, v = torch.cat([k, v], dim=1), torch.cat([v, k], dim=1)
        g = torch.Generator().manual_seed(3)
        wq = torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(4, D, D, generator=g,
                                                                    dtype=torch.float64)
        wo = torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(4, D, D, generator=g,
                                                                    dtype=torch.float64)
        bo = 0.1 * torch.randn(4, 1, D, generator=g, dtype=torch.float64)
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.group_kv(q, k, v, m, wq, wo, bo, 1, True,
                                                              0.5),
                lambda q, k, v, m: reference_group_kv(q, k, v, m, wq, wo, bo, 1, True, 0.5), {})
    if name == "prune_heads":
        q, k, v, m = _qkv(7, 9)                   # 2 heads over 1 kv head: head 0 dropped
        fill = torch.randn(H, D, dtype=torch.float64)
        keep = torch.tensor([1])
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.prune_heads(q[:, 1:], k, v, m,
                                                                 keep, fill, True, 0.5),
                lambda q, k, v, m: reference_prune_heads(q, k, v, m, torch.tensor([0, 1]), fill,
                                                         True, 0.5), {})
    if name == "softcap_attention":
        q, k, v, m = _qkv(7, 9)
        # the op computes in fp32: finite differences need a larger step and tolerance
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.softcap_attention(q, k, v, m, False, 0.5,
                                                                       2.0),
                lambda q, k, v, m: reference_softcap_attention(q, k, v, m, False, 0.5, 2.0),
                dict(eps=1e-3, atol=2e-3, rtol=2e-3))
    if name == "block_topk":
        q, k, v, m = _qkv(13)
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.block_topk(q, k, v, m, 4, 1, True, True,
                                                                0.5),
                lambda q, k, v, m: reference_block_topk(q, k, v, m, 4, 1, True, True, 0.5), {})
    if name == "neighborhood2d":
        q, k, v, m = _qkv(17)  # 1 prefix token + a 4x4 grid
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.neighborhood2d(q, k, v, m, 3, 1, 4, 4, 0.5),
                lambda q, k, v, m: reference_neighborhood2d(q, k, v, m, 3, 1, (4, 4), 0.5), {})
    if name == "linear_attention":
        q, k, v, _ = _qkv(10)
        m = _key_bias(10)
        p = MapParams("elu", 0.5)
        # The linear kernel computes in fp32 (it does not take fp64 inputs): it is called on
        # fp32 copies, and finite differences need a larger step and tolerance.
        return ((q, k, v, m),
                lambda q, k, v, m: torch.ops.attnopt.linear_attention(
                    q.float(), k.float(), v.float(), m.float(), None, None, None, None, None, True,
                    0.5, "elu", 4).double(),
                lambda q, k, v, m: reference_quadratic(q, k, v, m, p, is_causal=True),
                dict(eps=1e-3, atol=2e-3, rtol=2e-3))
    return None


OPS = sorted(_autograd.attnopt_ops())


def test_registry_ops_are_known():
    assert {"attention", "linear_attention", "sliding_window"} <= set(OPS)


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_backward_and_a_case(name):
    assert _autograd.has_backward(name), f"attnopt::{name} has no autograd formula"
    assert _case(name) is not None, f"add a gradient case for attnopt::{name} here"


@pytest.mark.parametrize("name", OPS)
def test_gradcheck(name):
    tensors, op, _, tol = _case(name)
    inputs = tuple(t.clone().requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(op, inputs, fast_mode=True, **tol)


@pytest.mark.parametrize("name", OPS)
def test_gradient_matches_dense_reference(name):
    tensors, op, ref, _ = _case(name)
    a = tuple(t.clone().requires_grad_() for t in tensors)
    b = tuple(t.clone().requires_grad_() for t in tensors)
    g = torch.randn_like(op(*a), dtype=torch.float64)
    (op(*a).double() * g).sum().backward()
    (ref(*b).double() * g).sum().backward()
    # the exact reference computes in fp32, the linear kernel too; the sparse ones in fp64
    tol = {"attention": 1e-5, "softcap_attention": 1e-5, "linear_attention": 1e-4,
           "group_kv": 1e-5, "prune_heads": 1e-5}.get(name, 1e-9)
    for x, y, what in zip(a, b, "qkvm"):
        err = ((x.grad - y.grad).abs().max() / y.grad.abs().max()).item()
        assert err < tol, f"{name}: d/d{what} differs from the reference by {err:.2e}"


def test_rows_that_see_no_key_get_zero_gradient():
    q, k, v, _ = _qkv(8)
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 3, :] = False  # query 3 sees nothing: its output is 0, a constant
    q.requires_grad_()
    out = torch.ops.attnopt.sliding_window(q, k, v, keep, 2, True, 0.5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert q.grad[..., 3, :].abs().max() == 0


def _tiny_llama():
    from attnopt.models import tiny

    return tiny("llama", batch=2, seq=12)


def test_exact_optimized_model_gradients_match_the_original():
    built = _tiny_llama()
    model = built.model
    fast = attnopt.optimize(model, built.inputs)
    assert fast.report.count("fused") == len(fast.report.rows) > 0
    ids = built.inputs["input_ids"]

    def grads(m, **extra):
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, attention_mask=built.inputs["attention_mask"], **extra).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        return {n.removeprefix("graph_module."): p.grad.clone() for n, p in m.named_parameters()
                if p.grad is not None}

    model.eval()
    ref = grads(model, use_cache=False)
    out = grads(fast)
    # parameter names of the captured graph follow the original's module paths
    common = sorted(set(ref) & set(out))
    assert len(common) == len(ref) == len(out), (sorted(ref)[:3], sorted(out)[:3])
    for name in common:
        err = ((out[name] - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{name}: gradient error {err:.2e}"
