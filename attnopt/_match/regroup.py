"""Scores viewed with their batch dims regrouped: ``[B·H, L, L]`` ↔ ``[B, H, L, L]`` and the like.

Attention code often reshapes the scores between the contraction, the masks and the softmax
(BLOOM's ``[B·H, L, L]`` → ``[B, H, L, L]``, fairseq's key-padding view, Swin's
``[B·nW, H, N, N]`` → ``[B, nW, H, N, N]`` for the shift mask). Such a view keeps the last two
(row, key) dims and only splits or merges leading batch dims, so the softmax commutes with it.
The matcher picks the finest of these layouts as the site's canonical one and maps every operand
(q, k, v, mask terms, per-head scales) into it with ``unflatten`` ops, and the output back with
``flatten`` ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from attnopt._match.graph import is_op, same_size, shape

aten = torch.ops.aten

VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class RegroupError(ValueError):
    """Two score layouts are not batch regroupings of each other; the message says why."""


def keeps_rows(node: Node) -> bool:
    """True for a view/reshape that keeps the last two dims of its input (batch regroup)."""
    if not is_op(node, *VIEW_OPS):
        return False
    a, b = shape(node.args[0]), shape(node)
    if a is None or b is None or len(a) < 2 or len(b) < 2 or len(a) == len(b) == 2:
        return False
    return same_size(a[-1], b[-1]) and same_size(a[-2], b[-2])


def groups(coarse: tuple, fine: tuple) -> list[list[int]]:
    """For each batch dim of ``coarse``, the run of ``fine`` batch dims it is made of."""
    cb, fb = coarse[:-2], fine[:-2]
    out: list[list[int]] = []
    j = 0
    for c in cb:
        run: list[int] = []
        p: Any = 1
        while j < len(fb):
            run.append(j)
            p = p * fb[j]
            j += 1
            if same_size(p, c):
                break
        if not run or not same_size(p, c):
            raise RegroupError(f"scores viewed as {_fmt(fine)} from {_fmt(coarse)}")
        out.append(run)
    if j != len(fb):
        raise RegroupError(f"scores viewed as {_fmt(fine)} from {_fmt(coarse)}")
    return out


def to_fine(tshape: tuple, coarse: tuple, fine: tuple,
            fine_sizes: list | None = None) -> tuple[tuple[Any, ...], ...]:
    """View ops taking a tensor broadcastable to ``coarse`` to one broadcastable to ``fine``.

    Args:
        tshape: the tensor's shape (its last two dims are not regrouped).
        coarse: the layout the tensor is used in.
        fine: the canonical layout.
        fine_sizes: the size arguments of the view that made the ``fine`` layout, if one did:
            its symbolic sizes as graph nodes let two dynamic dims be split apart.
    """
    runs = groups(coarse, fine)
    rc = len(coarse)
    pad = rc - len(tshape)
    if pad < 0:
        raise RegroupError(f"a tensor of rank {len(tshape)} on rank-{rc} scores")
    split = [i for i, r in enumerate(runs) if len(r) != 1]
    if all(i < pad for i in split):
        return ()  # right-aligned broadcasting already does it
    padded = (1,) * pad + tuple(tshape)
    ops: list[tuple[Any, ...]] = [("unsqueeze", 0)] * pad
    for i in reversed(split):
        sizes = [fine[j] for j in runs[i]]
        if isinstance(padded[i], int) and padded[i] == 1:
            ops.append(("unflatten", i, [1] * len(sizes)))
        elif same_size(padded[i], coarse[i]):
            given = [fine_sizes[j] if fine_sizes is not None and j < len(fine_sizes) else None
                     for j in runs[i]]
            out = [s if isinstance(s, int) else g if isinstance(g, Node) else -1
                   for s, g in zip(sizes, given)]
            if out.count(-1) > 1:
                raise RegroupError(f"two dynamic dims {sizes} merged in the scores")
            ops.append(("unflatten", i, out))
        else:
            raise RegroupError(f"a tensor of shape {_fmt(tshape)} broadcast over part of the "
                               f"merged dim {padded[i]}")
    return tuple(ops)


def to_coarse(coarse: tuple, fine: tuple) -> tuple[tuple[Any, ...], ...]:
    """View ops taking a ``fine``-layout output back to the ``coarse`` layout."""
    ops = []
    for run in reversed(groups(coarse, fine)):
        if len(run) > 1:
            ops.append(("flatten", run[0], run[-1]))
    return tuple(ops)


def _fmt(s: tuple) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"
