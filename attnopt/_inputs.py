"""Example inputs: normalise what users pass, and derive inputs of another batch size / length.

Users pass a tuple (positional args), a dict (keyword args, as HF models take them) or a single
tensor. Verification needs a second input whose dynamic dimensions differ from the example's; it
is made by tiling or cropping each example tensor along those dimensions, so token ids stay valid
ids and padding masks stay 0/1 patterns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt.errors import ConfigError


@dataclass
class Inputs:
    """Positional and keyword inputs of one model call."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def flat(self, in_spec: pytree.TreeSpec | None = None) -> list[Any]:
        """Leaves in the order of the exported program's input spec."""
        kwargs = self.kwargs
        if in_spec is not None:
            order = in_spec.child(1).context if in_spec.num_children == 2 else None
            if order is not None:
                kwargs = {k: self.kwargs[k] for k in order}
        return pytree.tree_leaves((self.args, kwargs))

    def call(self, fn):
        """Call ``fn`` with these inputs."""
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        """Shapes of the tensor inputs, for messages."""
        parts = [_desc(a) for a in self.args] + [f"{k}={_desc(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def normalize(example_inputs: Any) -> Inputs:
    """Turn a tuple / list / dict / tensor of example inputs into :class:`Inputs`."""
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs(args=(example_inputs,))
    if isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"example_inputs dict keys must be argument names, got {bad!r}")
        return Inputs(kwargs=dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return Inputs(args=tuple(example_inputs))
    raise ConfigError(
        "example_inputs must be a tuple of positional arguments, a dict of keyword arguments or "
        f"a tensor; got {type(example_inputs).__name__}"
    )


def resized(inputs: Inputs, symbolic_shapes: list[tuple | None], ranges: dict) -> Inputs | None:
    """Inputs whose dynamic dimensions take new values (None when nothing is dynamic).

    Args:
        inputs: the example inputs.
        symbolic_shapes: per flat leaf (in ``inputs.flat()`` order) the captured shape, whose
            entries are ints or SymInts; None for non-tensor leaves.
        ranges: ``ExportedProgram.range_constraints`` (sympy symbol → value range).
    """
    leaves, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    new_values = _new_symbol_values(leaves, symbolic_shapes, ranges)
    if not new_values:
        return None
    out = []
    for leaf, sshape in zip(leaves, symbolic_shapes):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            out.append(leaf)
            continue
        t = leaf
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                continue
            expr = s.node.expr.subs(new_values)
            if not expr.is_number:
                return None
            n = int(expr)
            if n != t.shape[d]:
                idx = torch.arange(n, device=t.device) % t.shape[d]
                t = t.index_select(d, idx)
        out.append(t.contiguous())
    args, kwargs = pytree.tree_unflatten(out, spec)
    return Inputs(args=tuple(args), kwargs=dict(kwargs))


def _new_symbol_values(leaves, symbolic_shapes, ranges) -> dict:
    """Pick a new value for every free symbol, inside its range."""
    examples: dict = {}
    for leaf, sshape in zip(leaves, symbolic_shapes):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            continue
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                continue
            expr = s.node.expr
            if expr.is_Symbol:
                examples.setdefault(expr, int(leaf.shape[d]))
            elif len(expr.free_symbols) == 1:
                sym = next(iter(expr.free_symbols))
                if sym not in examples:
                    import sympy

                    sol = sympy.solve(expr - int(leaf.shape[d]), sym)
                    if len(sol) == 1 and sol[0].is_integer:
                        examples[sym] = int(sol[0])
    new = {}
    for sym, v in examples.items():
        vr = ranges.get(sym)
        lo = _bound(vr.lower if vr is not None else None, 0)
        hi = _bound(vr.upper if vr is not None else None, 1 << 30)
        # Small sizes (batch, heads) double, which keeps ratios between them (GQA groups);
        # lengths grow by an odd amount, so they are no multiple of a block size.
        first = 2 * v if v <= 8 else v + 3
        for cand in (first, v + 1, v - 1, lo):
            if lo <= cand <= hi and cand != v:
                new[sym] = cand
                break
    return new


def _bound(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _desc(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype}".replace("torch.", "") + str(list(x.shape))
    return repr(x)
