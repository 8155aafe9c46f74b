"""Autograd for every attnopt op: forward op → the gradient of a differentiable recompute.

The fast kernels are not differentiable themselves (the blocked sparse kernels write into
reusable buffers with ``out=`` ops; the linear kernel runs under ``no_grad``). Each op's backward
therefore recomputes the same function with a differentiable implementation and calls
``torch.autograd.grad`` on it:

  * ``attention`` (exact): the op's own body, ``F.scaled_dot_product_attention``, whose autograd
    is SDPA's backward; ``softcap_attention``: its own body (an online softmax in plain torch);
  * ``group_kv``: its own body (mean pooling, matmuls and the exact ``attention`` op);
    ``prune_heads``: its own body (the exact op on the kept heads, copied into the constants);
  * ``linear_attention``: the chunked torch kernel ``linear_attention_torch`` (the one ``fit``
    trains through): memory linear in the sequence length;
  * the sparse ops (``sliding_window``, ``streaming``, ``streaming_heads``, ``block_topk``,
    ``neighborhood2d``): their dense references under the variant's pattern (float64 scores,
    ``[B, H, Lq, Lk]`` memory: the backward of a sparse op costs what dense attention costs).
    Rows that see no key are 0 in the forward; their gradient is 0, not the NaN the dense softmax
    would give.

The backward itself is one opaque custom op, ``attnopt::grad``, so ``torch.compile`` and
AOTAutograd trace it as a single call (they never look inside the recompute).

Every op defined by a registered variant's module must have an entry in ``_DIFFERENTIABLE``:
``register_all`` raises otherwise, so a new variant without a backward fails at import (and in
``tests/test_autograd.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch._library.custom_ops import CustomOpDef

from attnopt.variants import _base
from attnopt.variants import block_topk as _topk
from attnopt.variants import fused as _fused
from attnopt.variants import group_kv as _gkv
from attnopt.variants import linear as _linear
from attnopt.variants import neighborhood2d as _nbhd
from attnopt.variants import prune_heads as _prune
from attnopt.variants import sliding_window as _window
from attnopt.variants import softcap as _softcap
from attnopt.variants import streaming as _streaming
from attnopt.variants import streaming_heads as _heads
from attnopt.variants._feature_maps import MapParams


def _exact(q, k, v, attn_mask, is_causal, scale):
    return _fused.attention._init_fn(q, k, v, attn_mask, is_causal, scale)


def _linear_attention(q, k, v, attn_mask, wq, bq, wk, bk, omega, is_causal, scale, feature_map,
                      block):
    p = MapParams(feature_map, scale, wq, bq, wk, bk, omega)
    kw = _linear.key_weights(attn_mask, q.shape[1], k.shape[1], k.shape[2])
    return _linear.linear_attention_torch(q, k, v, kw, p, is_causal, block).to(q.dtype)


def _softcap_attention(q, k, v, attn_mask, is_causal, scale, softcap):
    # the op's body is plain differentiable torch (online softmax, no out= buffers)
    return _softcap.softcap_attention._init_fn(q, k, v, attn_mask, is_causal, scale, softcap)


def _streaming_heads(q, k, v, attn_mask, full, n_full, sinks, window, scale):
    return _heads.reference_streaming_heads(q, k, v, attn_mask, full, sinks, window, scale)


def _group_kv(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale):
    # the op's body is differentiable: mean pooling, matmuls and the exact attention op
    return _gkv.group_kv._init_fn(q, k, v, attn_mask, wq, wo, bo, groups, is_causal, scale)


def _prune_heads(q, k, v, attn_mask, keep, fill, is_causal, scale):
    # the op's body is differentiable: the exact attention op and an index_copy into a copy
    return _prune.prune_heads._init_fn(q, k, v, attn_mask, keep, fill, is_causal, scale)


def _neighborhood2d(q, k, v, attn_mask, kernel, dilation, grid_h, grid_w, scale):
    return _nbhd.reference_neighborhood2d(q, k, v, attn_mask, kernel, dilation, (grid_h, grid_w),
                                          scale)


#: op name → a differentiable function with the op's signature, and whether rows that see no key
#: (0 in the forward) must have their NaN gradients zeroed.
_DIFFERENTIABLE: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "attention": (_exact, False),
    "softcap_attention": (_softcap_attention, False),
    "group_kv": (_group_kv, False),
    "prune_heads": (_prune_heads, False),
    "linear_attention": (_linear_attention, False),
    "sliding_window": (_window.reference_sliding_window, True),
    "streaming": (_streaming.reference_streaming, True),
    "streaming_heads": (_streaming_heads, True),
    "block_topk": (_topk.reference_block_topk, True),
    "neighborhood2d": (_neighborhood2d, True),
}


def attnopt_ops() -> dict[str, CustomOpDef]:
    """Every custom op defined by a registered variant's module, by op name."""
    ops: dict[str, CustomOpDef] = {}
    for cls in _base.registered().values():
        for obj in vars(sys.modules[cls.__module__]).values():
            if isinstance(obj, CustomOpDef) and obj._namespace == "attnopt":
                ops[obj._name] = obj
    return ops


def has_backward(name: str) -> bool:
    """True when ``torch.ops.attnopt.<name>`` has an autograd formula registered here."""
    return name in _REGISTERED


# -- the backward op ---------------------------------------------------------------------------


@torch.library.custom_op("attnopt::grad", mutates_args=())
def grad(op: str, constants: str, grad_out: torch.Tensor,
         tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Gradients of ``torch.ops.attnopt.<op>`` w.r.t. its tensor arguments.

    Args:
        op: the forward op's name.
        constants: JSON of the forward's non-tensor arguments, by position.
        grad_out: gradient of the forward's output.
        tensors: the forward's tensor arguments, in order (None where the forward had None).

    Returns:
        One contiguous tensor per entry of ``tensors``: its gradient (zeros when it has none),
        or an empty tensor where the forward had None.
    """
    fn, zero_nan = _DIFFERENTIABLE[op]
    layout = json.loads(constants)
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point())
              for t in tensors]
    it = iter(leaves)
    args = [next(it) if slot is None else slot["value"] for slot in layout]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with _autograd_on(), torch.enable_grad():
        out = fn(*args)
        found = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    by_id = {id(t): g for t, g in zip(wanted, found)}
    result = []
    for t in leaves:
        if t is None:
            result.append(grad_out.new_empty(0))
            continue
        g = by_id.get(id(t))
        g = torch.zeros_like(t) if g is None else g
        result.append((g.nan_to_num(nan=0.0) if zero_nan else g).contiguous())
    return result


def _autograd_on() -> torch._C._ForceDispatchKeyGuard:
    """Re-enable autograd dispatch, which a custom op's kernel runs below."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(
        torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@grad.register_fake
def _(op, constants, grad_out, tensors):
    return [grad_out.new_empty(0) if t is None else t.new_empty(t.shape) for t in tensors]


# -- registration --------------------------------------------------------------------------------

_REGISTERED: set[str] = set()


def _register(name: str, op: CustomOpDef) -> None:
    def setup_context(ctx, inputs, output):
        tensor_slots = [isinstance(x, torch.Tensor) or x is None for x in inputs]
        # serialised only in backward: under torch.export the constants may be SymInts (e.g. a
        # dynamic patch grid), which backward never sees
        ctx.constants = [None if t else x for x, t in zip(inputs, tensor_slots)]
        ctx.slots = tensor_slots
        ctx.save_for_backward(*[x for x, t in zip(inputs, tensor_slots) if t])

    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        layout = json.dumps([None if t else {"value": x}
                             for x, t in zip(ctx.constants, ctx.slots)])
        grads = torch.ops.attnopt.grad(name, layout, grad_out.contiguous(), saved)
        out: list[Any] = []
        it = iter(zip(saved, grads))
        for is_tensor, needed in zip(ctx.slots, ctx.needs_input_grad):
            if not is_tensor:
                out.append(None)
                continue
            x, g = next(it)
            out.append(g if needed and x is not None else None)
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
    _REGISTERED.add(name)


def register_all() -> None:
    """Register the autograd formula of every attnopt op (called when the package loads)."""
    for name, op in attnopt_ops().items():
        if name in _REGISTERED:
            continue
        if name not in _DIFFERENTIABLE:
            raise TypeError(f"attnopt op {name!r} has no differentiable recompute in "
                            f"attnopt/variants/_autograd.py: add one so it can be trained")
        _register(name, op)


register_all()
