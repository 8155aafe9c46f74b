"""ONNX building blocks shared by the ONNX translations of attnopt ops (all variants).

Translations receive tensors as onnxscript values whose ``.shape`` / ``.dtype`` are known at
translation time (dims may be symbolic); everything here keeps symbolic dims symbolic by reading
sizes with ``Shape`` at run time instead of baking them in.

``op`` (onnxscript's opset 23) and ``ir`` (onnx_ir) are imported on first use: onnxscript and
onnx_ir take seconds to import and ``import attnopt`` needs neither until something is exported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from attnopt.errors import ExportError

FLOAT_MIN = -3.4028234663852886e38


class _Lazy:
    """Stands for a module (or module attribute) imported on first attribute access."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._target: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._target is None:
            self._target = self._load()
        return getattr(self._target, name)


#: onnxscript's ``opset23`` (``op.MatMul(a, b)``), imported on first use.
op: Any = _Lazy(lambda: importlib.import_module("onnxscript").opset23)
#: the ``onnx_ir`` module (``ir.DataType.FLOAT``, ``ir.tensor(...)``), imported on first use.
ir: Any = _Lazy(lambda: importlib.import_module("onnx_ir"))


def ints(*values: int) -> Any:
    """A constant int64 tensor ``[values...]``."""
    return op.Constant(value_ints=list(values))


def scalar_i(value: int) -> Any:
    """A constant int64 scalar."""
    return op.Constant(value_int=value)


def scalar_f(value: float) -> Any:
    """A constant float32 scalar."""
    return op.Constant(value_float=value)


def const(array: np.ndarray) -> Any:
    """A constant tensor holding ``array`` (dtype kept)."""
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def static(x: Any, axis: int, what: str, *, who: str = "attention",
           hint: str = "export with static head counts and sizes") -> int:
    """Dim ``axis`` of ``x``, which the translation needs as a number.

    Raises:
        ExportError: the dim is symbolic (or unknown) at translation time.
    """
    dim = static_dim(x, axis)
    if dim is None:
        got = x.shape[axis] if getattr(x, "shape", None) is not None else None
        raise ExportError(f"{who} export needs a static {what} (axis {axis}); got {got!r}: "
                          f"{hint}")
    return dim


def static_dim(x: Any, i: int) -> int | None:
    """Dim ``i`` of ``x`` when it is a known integer at translation time, else None."""
    try:
        d = x.shape[i]
    except (TypeError, IndexError, AttributeError):
        return None
    if isinstance(d, int):
        return d
    # A dynamic dim the program pinned to a value (``torch._check(s == 6)``) arrives as a
    # symbolic dim named by that value.
    name = getattr(d, "value", None)
    return int(name) if isinstance(name, str) and name.isdigit() else None


def rank(x: Any) -> int | None:
    """Rank of ``x`` at translation time, when known."""
    try:
        return len(x.shape)
    except (TypeError, AttributeError):
        return None


def is_bool(x: Any) -> bool:
    """True when ``x`` is a boolean tensor."""
    return getattr(x, "dtype", None) == ir.DataType.BOOL


def bnsh_to_bsd(x):
    """``[B, N, S, H]`` → ``[B, S, N*H]`` (the packed layout of ORT contrib ops)."""
    t = op.Transpose(x, perm=[0, 2, 1, 3])
    return op.Reshape(t, op.Constant(value_ints=[0, 0, -1]))


def bsd_to_bnsh(x, heads: int):
    """``[B, S, N*H]`` → ``[B, N, S, H]``."""
    t = op.Reshape(x, op.Constant(value_ints=[0, 0, heads, -1]))
    return op.Transpose(t, perm=[0, 2, 1, 3])


def to_rank4(mask, r: int | None = None):
    """Prepend size-1 dims until ``mask`` (of rank ``r``, read from it if not given) is 4-D."""
    r = rank(mask) if r is None else r
    if r is None or r >= 4:
        return mask
    return op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - r))))


def needs_query_expand(mask) -> bool:
    """True when a mask broadcasts over queries (``[.., 1, Lk]``); ORT kernels need it full."""
    r = rank(mask)
    return r is not None and (r < 2 or static_dim(mask, -2) == 1)


def expand_query_dim(mask, q):
    """Broadcast a 4-D mask's query dim to q's length (``[.., 1, Lk]`` → ``[.., Lq, Lk]``)."""
    lq = op.Shape(q, start=2, end=3)
    one = op.Constant(value_ints=[1])
    return op.Expand(mask, op.Concat(one, one, lq, one, axis=0))


def additive(mask, dtype_like):
    """A float additive mask from a bool (True = attend) or float mask, in q's dtype."""
    if is_bool(mask):
        zero = op.CastLike(op.Constant(value_float=0.0), dtype_like)
        neg = op.CastLike(op.Constant(value_float=float("-inf")), dtype_like)
        return op.Where(mask, zero, neg)
    return op.CastLike(mask, dtype_like)


def repeat_heads(x, rep: int):
    """Repeat kv heads of ``[B, Hkv, S, D]`` ``rep`` times each (GQA → MHA layout)."""
    if rep == 1:
        return x
    u = op.Unsqueeze(x, op.Constant(value_ints=[2]))
    shape = op.Shape(u)
    target = op.Concat(
        op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[2])),
        op.Constant(value_ints=[rep]),
        op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[5])),
        axis=0,
    )
    e = op.Expand(u, target)
    xs = op.Shape(x)
    out_shape = op.Concat(
        op.Slice(xs, op.Constant(value_ints=[0]), op.Constant(value_ints=[1])),
        op.Constant(value_ints=[-1]),
        op.Slice(xs, op.Constant(value_ints=[2]), op.Constant(value_ints=[4])),
        axis=0,
    )
    return op.Reshape(e, out_shape)


def heads_in_batch(q, k, v, attn_mask) -> bool:
    """True for the layout of attention written on 3-D ``[B·H, L, D]`` tensors.

    That is q/k/v ``[1, B·H, L, D]`` with the same (dynamic) ``B·H``, and a mask (if any)
    whose leading dim is 1.
    """
    if any(static_dim(x, 0) != 1 for x in (q, k, v)):
        return False
    try:
        same = q.shape[1] == k.shape[1] == v.shape[1]
    except (TypeError, IndexError, AttributeError):
        return False
    r = rank(attn_mask) if attn_mask is not None else 0
    return bool(same) and r is not None and (r < 4 or static_dim(attn_mask, 0) == 1)


def folded_heads(q, k, v, attn_mask) -> bool:
    """Heads folded into a dynamic batch (``[1, B·H, L, D]``): no static head count to read."""
    return static_dim(q, 1) is None and heads_in_batch(q, k, v, attn_mask)


def swap_batch_heads(x):
    """``[1, B·H, ...]`` ↔ ``[B·H, 1, ...]`` (4-D), keeping the known shape and dtype.

    Lowerings read static sizes from their operands' shapes, which the exporter does not infer
    for values built inside a translation; the permuted shape is set here.
    """
    out = op.Transpose(x, perm=[1, 0, 2, 3])
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) == 4 and getattr(out, "shape", None) is None:
        import onnx_ir as ir

        out.shape = ir.Shape([shape[1], shape[0], shape[2], shape[3]])
    if getattr(out, "dtype", None) is None and getattr(x, "dtype", None) is not None:
        out.dtype = x.dtype
    return out


def as_one_head_sequences(fn, q, k, v, attn_mask, *args, **kwargs):
    """Run the lowering ``fn`` on ``[1, B·H, L, D]`` operands as ``B·H`` one-head sequences.

    A lowering that needs a static head count (block-wise sparse and linear decompositions)
    gets ``[B·H, 1, L, D]`` operands and a mask made 4-D and swapped the same way; its output
    is swapped back.
    """
    if attn_mask is not None:
        attn_mask = swap_batch_heads(to_rank4(attn_mask))
    out = fn(swap_batch_heads(q), swap_batch_heads(k), swap_batch_heads(v), attn_mask,
             *args, **kwargs)
    return swap_batch_heads(out)
