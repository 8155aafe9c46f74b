"""Layout recipes: how to read a graph value in the canonical ``[*batch, L, D]`` layout.

The matcher never rewrites while it matches; it describes each canonical operand as a graph node
plus a short list of view ops (permute, transpose, unsqueeze, ...). The rewrite pass replays the
list to create the nodes. Einsum equations of score and value contractions are parsed here.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten


@dataclass(frozen=True)
class Recipe:
    """A graph node read through a list of view ops, e.g. ``(k, [("transpose", -2, -1)])``."""

    node: Node
    ops: tuple[tuple[Any, ...], ...] = field(default_factory=tuple)

    def then(self, *op: Any) -> Recipe:
        """This recipe followed by one more view op."""
        return Recipe(self.node, self.ops + (tuple(op),))

    def emit(self, graph: Graph) -> Node:
        """Insert the view ops into ``graph`` (at its current insertion point); return result."""
        out = self.node
        for op, *args in self.ops:
            out = graph.call_function(_VIEW_OPS[op], (out, *args))
        return out


def ops_shape(s: tuple | None, ops: tuple[tuple[Any, ...], ...]) -> tuple | None:
    """The shape that view ``ops`` (as in a :class:`Recipe`) make of shape ``s``."""
    if s is None:
        return None
    s = list(s)
    for op, *args in ops:
        if op == "permute":
            s = [s[i] for i in args[0]]
        elif op == "transpose":
            a, b = (_dim(d, len(s)) for d in args[:2])
            s[a], s[b] = s[b], s[a]
        elif op == "unsqueeze":
            s.insert(_dim(args[0], len(s) + 1), 1)
        elif op == "flatten":
            a, b = (_dim(d, len(s)) for d in args[:2])
            n = 1
            for d in s[a:b + 1]:
                n = n * d
            s[a:b + 1] = [n]
        elif op == "unflatten":
            i = _dim(args[0], len(s))
            sizes = [d.meta.get("val") if isinstance(d, Node) else d for d in args[1]]
            if -1 in sizes:
                known = 1
                for d in sizes:
                    known = known * (1 if d == -1 else d)
                sizes[sizes.index(-1)] = s[i] // known
            s[i:i + 1] = sizes
        else:
            return None
    return tuple(s)


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


_VIEW_OPS = {
    "permute": aten.permute.default,
    "transpose": aten.transpose.int,
    "unsqueeze": aten.unsqueeze.default,
    "squeeze": aten.squeeze.dim,
    "flatten": aten.flatten.using_ints,
    "unflatten": aten.unflatten.int,
    "mul": aten.mul.Tensor,
    "expand": aten.expand.default,
}


class EinsumError(ValueError):
    """An einsum equation is not a two-operand attention contraction; the message says why."""


def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Split ``equation`` into operand letter strings and the output string, ellipses expanded.

    Args:
        equation: e.g. ``"bhqd,bhkd->bhqk"`` or ``"...qd,...kd->...qk"``.
        ranks: the rank of each operand.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise EinsumError(f"implicit-output einsum {equation!r} is not supported")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        raise EinsumError(f"einsum {equation!r} has {len(ins)} operands, expected {len(ranks)}")
    used = set(eq)
    spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used]
    ell_len = 0
    for s, r in zip(ins, ranks):
        if "..." in s:
            ell_len = max(ell_len, r - (len(s) - 3))
    ell = "".join(spare[:ell_len])
    expanded = []
    for s, r in zip(ins, ranks):
        if "..." in s:
            n = r - (len(s) - 3)
            s = s.replace("...", ell[ell_len - n :])
        if len(s) != r:
            raise EinsumError(f"einsum {equation!r} does not match operand rank {r}")
        expanded.append(s)
    out = out.replace("...", ell)
    return expanded, out


def to_canonical(letters: str, batch: str, row: str, col: str, node: Node) -> Recipe:
    """Recipe reading an einsum operand with ``letters`` as ``[*batch, row, col]``.

    Batch letters missing from the operand become size-1 dims (broadcast), as einsum does.
    """
    present = [c for c in batch if c in letters]
    order = present + [row, col]
    perm = [letters.index(c) for c in order]
    recipe = Recipe(node)
    if perm != list(range(len(perm))):
        recipe = recipe.then("permute", perm)
    for i, c in enumerate(batch):
        if c not in letters:
            recipe = recipe.then("unsqueeze", i)
    return recipe
