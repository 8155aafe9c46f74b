"""Cleanup: drop what a rewrite made dead, then lint and recompile.

Export graphs hold ``_assert_tensor_metadata`` nodes that *use* a tensor without consuming it;
they are impure, so dead-code elimination keeps them and, through them, the replaced attention
subgraph. Asserts whose tensor has no other use are removed first.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from attnopt._match.graph import ASSERT_OPS, is_op, value_users


def cleanup(gm: GraphModule) -> int:
    """Remove dead nodes (and asserts on dead tensors) from ``gm``; return how many went."""
    before = len(gm.graph.nodes)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if is_op(node, *ASSERT_OPS):
                target = node.args[0] if node.args else None
                if target is not None and not value_users(target) and _dead(target):
                    gm.graph.erase_node(node)
                    changed = True
        if gm.graph.eliminate_dead_code(is_impure_node=_is_impure):
            changed = True
    gm.graph.lint()
    gm.recompile()
    return before - len(gm.graph.nodes)


def _is_impure(node) -> bool:
    """FX's purity, except that eval-mode dropout and dropout-free SDPA are pure.

    FX counts every op that *may* draw random numbers as impure, so a dead
    ``dropout(p, train=False)`` would keep the replaced softmax and its N×N scores alive, and a
    replaced SDPA call would still run.
    """
    if is_op(node, torch.ops.aten.dropout.default):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        if not train or p == 0:
            return False
    if node.meta.get("attnopt_dead_write"):  # an in-place update of replaced scores
        return False
    if is_op(node, torch.ops.aten.scaled_dot_product_attention.default):
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if p == 0:
            return False
    return node.is_impure()


def _dead(node) -> bool:
    """A tensor node is dead when nothing but asserts uses it and it has no side effects."""
    return node.op == "call_function" and not node.is_impure()
