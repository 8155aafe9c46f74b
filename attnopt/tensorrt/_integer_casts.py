"""Integer ``CumSum`` / ``Clip`` outside the operator matrix → ``Cast → op → Cast`` around them.

Model code computes position ids (``cumsum`` of the attention mask: BLOOM, OPT, XLM-R) and
bucketed relative positions (``clamp``: T5, DeBERTa-v2) on INT64 tensors; TensorRT's matrix
accepts ``CumSum`` and ``Clip`` on floating types only. Each such node gets its data inputs cast
to a type the matrix accepts for the op (INT32 where accepted, else FP32) and its output cast
back, so the rest of the graph keeps its types.

Constraints:
  * only ops whose result on integers equals the result on those integers in the wider type
    (``CumSum``, ``Clip``): no division, rounding or overflow semantics change;
  * INT32 is exact for ``|x| < 2^31`` and FP32 for ``|x| < 2^24`` (every integer up to 16.7M;
    a cumulative sum stays below that for sequences shorter than 2^24 tokens): positions and
    bucket indices are far smaller;
  * types come from ONNX shape inference; a value whose type is not inferred is left alone (the
    check reports it if it matters).
"""

from __future__ import annotations

from typing import Any

from attnopt.tensorrt._matrix import Matrix

# op type -> the inputs carrying data (the rest, e.g. CumSum's axis, keep their type)
_CASTABLE = {"CumSum": (0,), "Clip": (0, 1, 2)}
# matrix type names <-> ONNX TensorProto element types
_INT32, _FLOAT = 6, 1
_INTEGERS = (7, 6, 3, 2)  # INT64, INT32, INT8, UINT8
_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8"}


def cast_integer_ops(model: Any, m: Matrix) -> list[str]:
    """Wrap every integer ``CumSum`` / ``Clip`` the matrix rejects in Casts (in place).

    Returns one note per rewritten node (for the export report).
    """
    import onnx

    from attnopt.tensorrt.check import _infer

    types, _ = _infer(model)
    graph = model.graph
    nodes, notes = [], []
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for node in graph.node:
        have = types.get(node.input[0]) if node.input else None
        target = _target_type(node, have, m)
        if target is None:
            nodes.append(node)
            continue
        name = node.name or node.op_type
        for i in _CASTABLE[node.op_type]:
            if i >= len(node.input) or not node.input[i]:
                continue
            cast = _fresh(f"{node.input[i]}_as_{_NAMES[target].lower()}", taken)
            nodes.append(onnx.helper.make_node("Cast", [node.input[i]], [cast], to=target,
                                               name=_fresh(f"{name}_cast_in{i}", taken)))
            node.input[i] = cast
        out = node.output[0]
        wide = _fresh(f"{out}_{_NAMES[target].lower()}", taken)
        node.output[0] = wide
        nodes.append(node)
        nodes.append(onnx.helper.make_node("Cast", [wide], [out], to=have,  # T(out) = T(in)
                                           name=_fresh(f"{name}_cast_out", taken)))
        notes.append(f"{node.op_type} {name!r} on {_NAMES[have]} "
                     f"computed in {_NAMES[target]} (Casts around it; TensorRT "
                     f"{m.version}'s matrix has no integer {node.op_type})")
    del graph.node[:]
    graph.node.extend(nodes)
    return notes


def _target_type(node, have: int | None, m: Matrix) -> int | None:
    """INT32 or FLOAT when ``node`` is a castable op on an integer type (``have``) the matrix
    rejects, else None.
    """
    if node.op_type not in _CASTABLE or node.domain not in ("", "ai.onnx") or have is None:
        return None
    support = m.ops.get(node.op_type)
    if support is None or support.types is None:
        return None
    if have not in _INTEGERS or _NAMES[have] in support.types:
        return None
    if "INT32" in support.types:
        return _INT32
    return _FLOAT if "FP32" in support.types else None


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
