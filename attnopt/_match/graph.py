"""Small helpers over torch.fx nodes of an ATen-level export graph: op tests, shapes, users."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

# Ops that record tensor metadata for runtime asserts; they use a node without consuming its value.
ASSERT_OPS = {aten._assert_tensor_metadata.default}

# Ops whose first tensor argument is only read for its shape, dtype or device, never its values.
SHAPE_ONLY_OPS = {
    aten.sym_size.int,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
}

CAST_OPS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.type_as.default,
}

IDENTITY_OPS = {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
}


def is_op(node: Any, *targets: Any) -> bool:
    """Return True when ``node`` is a call_function node whose target is one of ``targets``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor recorded for ``node`` by torch.export, or None when it is not a tensor."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def shape(node: Any) -> tuple | None:
    """The (possibly symbolic) shape of ``node``'s value, or None when unknown."""
    val = fake(node)
    return tuple(val.shape) if val is not None else None


def rank(node: Any) -> int | None:
    """The number of dimensions of ``node``'s value, or None when unknown."""
    s = shape(node)
    return len(s) if s is not None else None


def dtype(node: Any) -> torch.dtype | None:
    """The dtype of ``node``'s value, or None when unknown."""
    val = fake(node)
    return val.dtype if val is not None else None


def same_size(a: Any, b: Any) -> bool:
    """True when two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - symbolic reasoning may refuse; treat as unknown
        return False


def size_str(s: Any) -> str:
    """A readable rendering of a (possibly symbolic) size."""
    return str(s)


def hint(s: Any) -> int | None:
    """The concrete example value behind a (possibly symbolic) size."""
    if isinstance(s, int):
        return s
    try:
        node = s.node
        if node.hint is not None:
            return int(node.hint)
        from torch.fx.experimental.symbolic_shapes import guard_int

        return guard_int(s)
    except Exception:  # noqa: BLE001
        return None


def value_users(node: Node) -> list[Node]:
    """Users of ``node`` that consume its value (runtime metadata asserts excluded)."""
    return [u for u in node.users if not is_op(u, *ASSERT_OPS)]


def normalize_dim(dim: int, ndim: int) -> int:
    """Map a possibly negative dimension index to its non-negative form."""
    return dim + ndim if dim < 0 else dim


def constant_scalar(arg: Any) -> float | None:
    """The value of a Python number argument, or None for anything else."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    return None


def ancestors(nodes: Iterable[Node], *, stop: set[Node] | None = None) -> set[Node]:
    """All nodes that ``nodes`` depend on (inclusive), not walking past ``stop``."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop and n in stop:
            continue
        stack.extend(n.all_input_nodes)
    return seen


class InputDependence:
    """Answers "does this node's *value* depend on the model's input values?" for a whole graph.

    Shapes of inputs do not count: a causal mask built from ``arange(seq_len)`` depends on the
    input's shape only, so it is input-independent and can be evaluated for any size.
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self._dep: dict[Node, bool] = {}
        for n in graph.nodes:  # graph order is topological
            if n.op == "placeholder":
                self._dep[n] = True
            else:
                self._dep[n] = any(self._dep.get(a, False) for a in _value_inputs(n))

    def __call__(self, node: Node) -> bool:
        if node not in self._dep:  # a node added after construction
            self._dep[node] = any(self(a) for a in _value_inputs(node))
        return self._dep[node]


def _value_inputs(n: Node) -> list[Node]:
    if n.op == "call_function" and n.target in SHAPE_ONLY_OPS:
        first = n.args[0] if n.args else None
        return [a for a in n.all_input_nodes if a is not first]
    return list(n.all_input_nodes)
