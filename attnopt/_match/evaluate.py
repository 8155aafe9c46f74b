"""Evaluate input-independent parts of a graph (masks, scales) for several input sizes.

A causal mask built in-graph from ``arange``/``tril``/compare ops depends only on shapes. Running
just its subgraph for the example inputs and for inputs of another size tells what it *is*
(causal? all-true? a band?) without guessing from the op spelling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from attnopt._match.graph import ancestors


class Evaluator:
    """Computes node values of ``gm`` for each of a few flat input sets (memoised).

    Args:
        gm: the captured (unlifted) graph module; placeholders are the flat user inputs.
        input_sets: one list of flat inputs per size to evaluate at (the example first).
    """

    def __init__(self, gm: GraphModule, input_sets: list[list[Any]]) -> None:
        self._gm = gm
        self._placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for flat in input_sets:
            if len(flat) != len(self._placeholders):
                raise ValueError(
                    f"{len(flat)} flat inputs for {len(self._placeholders)} graph placeholders"
                )
        self._input_sets = input_sets
        self._memo: dict[Node, list[Any]] = {}

    @property
    def num_sets(self) -> int:
        """How many input sets each value is computed for."""
        return len(self._input_sets)

    def values(self, node: Node) -> list[Any]:
        """The value of ``node`` for each input set."""
        if node not in self._memo:
            self._memo[node] = self._run(node)
        return self._memo[node]

    def _run(self, target: Node) -> list[Any]:
        needed = ancestors([target])
        graph = Graph()
        env: dict[Node, Node] = {}
        used_placeholders = []
        for n in self._gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder":
                used_placeholders.append(self._placeholders.index(n))
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[target])
        sub = GraphModule(self._gm, graph)
        with torch.no_grad():
            return [sub(*[flat[i] for i in used_placeholders]) for flat in self._input_sets]


def scalar_value(ev: Evaluator, arg: Any) -> float | None:
    """The value of a scalar-like argument (number, SymFloat node, 1-element constant tensor).

    Returns None unless the value is the same for every input set (a scale that changes with the
    sequence length is not a constant).
    """
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, Node):
        return None
    try:
        vals = ev.values(arg)
    except Exception:  # noqa: BLE001 - a subgraph that cannot run alone is simply not constant
        return None
    out = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1 or v.dtype == torch.bool:
                return None
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out.append(float(v))
    return out[0] if all(o == out[0] for o in out) else None
