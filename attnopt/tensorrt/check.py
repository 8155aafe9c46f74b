"""GPU-free TensorRT compatibility check: ONNX file → the nodes TensorRT's parser would refuse.

    check("model.onnx", version="11.4") -> CheckResult(ok, problems)

Checked against the ONNX-TensorRT operator matrix of that version (``operator_matrix.json``):
the opset range, each node's domain and op type, the data types of its data inputs (as
inferred by ONNX shape inference), the graph's input / output types, and the documented
restrictions attnopt can check mechanically (Attention's single output and 4-D operands,
``TopK``'s ``sorted`` and ``K``, constant ``axes`` ...). Restrictions it cannot check are
attached to the result as notes on the nodes they concern. Passing the check does not prove an
engine builds (kernels, memory and tactics are decided on the GPU); failing it means the parser
or builder refuses the file as documented.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from attnopt.tensorrt._matrix import DEFAULT_VERSION, Matrix, matrix

STANDARD_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto element type → the names the matrix uses (op types / model data types).
_OP_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8",
                  2: "UINT8", 9: "BOOL", 11: "DOUBLE", 17: "FP8", 18: "FP8", 19: "FP8",
                  20: "FP8", 22: "INT4", 23: "FP4"}
_MODEL_TYPE_NAMES = {"FP32": "FLOAT32", "FP16": "FLOAT16", "BF16": "BFLOAT16"}

_OP_FIXES = {
    "Attention": "export with target='tensorrt', tensorrt_version=<this release>: attnopt then "
                 "writes the MatMul -> Softmax -> MatMul pattern TensorRT fuses",
}

_DOMAIN_FIXES = {
    "com.microsoft": "ONNX Runtime contrib ops are not parsed by TensorRT: export with "
                     "target='tensorrt' (standard ONNX only), or register a TensorRT plugin "
                     "for the op",
}


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT's parser or builder would refuse the file.

    Attributes:
        node: the node's name ("" for model-level problems).
        op_type: the node's op type (or "model" / "input" / "output").
        domain: the node's domain.
        reason: what is wrong, per the matrix of the checked version.
        fix: what to do about it.
        severity: "error" (documented as unsupported) or "warning" (undocumented behaviour).
    """

    node: str
    op_type: str
    domain: str
    reason: str
    fix: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self._op()})" if self.node else self._op()
        return f"{self.severity}: {where}: {self.reason}. Fix: {self.fix}"

    def _op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain not in STANDARD_DOMAINS \
            else self.op_type

    def to_dict(self) -> dict[str, str]:
        """Plain data."""
        return {"node": self.node, "op_type": self.op_type, "domain": self.domain,
                "reason": self.reason, "fix": self.fix, "severity": self.severity}


@dataclass
class CheckResult:
    """The outcome of :func:`check`.

    Attributes:
        ok: no error-level problem (warnings allowed).
        problems: every problem found, in graph order.
        version: the TensorRT version asked for; ``matrix_version`` the data entry used.
        source: where that matrix comes from.
        notes: documented restrictions of ops in the file that the check cannot verify.
        nodes: how many nodes were checked.
    """

    version: str
    matrix_version: str
    source: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem is an error."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        """The error-level problems."""
        return [p for p in self.problems if p.severity == "error"]

    def __str__(self) -> str:
        head = (f"TensorRT {self.version} compatibility (matrix {self.matrix_version}): "
                f"{'OK' if self.ok else 'FAILED'}, {self.nodes} nodes, "
                f"{len(self.errors)} errors, {len(self.problems) - len(self.errors)} warnings")
        lines = [head] + [f"  {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"ok": self.ok, "version": self.version, "matrix_version": self.matrix_version,
                "source": self.source, "nodes": self.nodes,
                "problems": [p.to_dict() for p in self.problems], "notes": self.notes}


def check(onnx_path: str | os.PathLike | Any, version: str = DEFAULT_VERSION) -> CheckResult:
    """Check an ONNX file (or ``onnx.ModelProto``) against TensorRT ``version``'s ONNX parser.

    Args:
        onnx_path: the ``.onnx`` file (external data is not loaded: only the graph is read).
        version: the TensorRT release, e.g. ``"11.4"`` or ``"10.15.1"``; the matrix of the
            newest known release not newer than it (same major) is used.

    Returns:
        A :class:`CheckResult`; ``result.ok`` is False when some node is documented as
        unsupported. Each problem names the node, the reason and a fix.

    Raises:
        ConfigError: unknown version, or the file is missing / not an ONNX model.
    """
    model = _load(onnx_path)
    m = matrix(str(version))
    result = CheckResult(version=str(version), matrix_version=m.version, source=m.source_text())
    types, shapes = _infer(model)
    consts = _Constants(model.graph)
    _check_opset(model, m, result)
    _check_io(model.graph, m, types, result)
    seen_notes: set[str] = set()
    functions = {(f.domain, f.name): f for f in model.functions}
    for node in _nodes(model.graph, functions):
        result.nodes += 1
        _check_node(node, m, types, shapes, consts, result, seen_notes)
    return result


# -- model level -----------------------------------------------------------------------------------


def _load(path: Any):
    import onnx

    from attnopt.errors import ConfigError

    if isinstance(path, onnx.ModelProto):
        return path
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any decode failure is the user's file
        raise ConfigError(f"{path} is not a readable ONNX model: {e}") from e


def _infer(model) -> tuple[dict[str, int], dict[str, list[int | str | None]]]:
    """Element types and shapes of every value, from ONNX shape inference (best effort)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference gaps only make the type checks skip values
        inferred = model
    types: dict[str, int] = {}
    shapes: dict[str, list[int | str | None]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        t = vi.type.tensor_type
        if t.elem_type:
            types[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else
                               (d.dim_param or None) for d in t.shape.dim]
    for init in g.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    return types, shapes


class _Constants(set):
    """Values TensorRT can resolve at build time: initializers, Constant outputs and values
    computed only from those; ``values`` holds the literal small ones (initializers and
    Constant nodes of at most 16 elements).
    """

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        super().__init__({i.name for i in graph.initializer} | {""})
        self.values: dict[str, Any] = {}
        for init in graph.initializer:
            if _numel(init.dims) <= 16:
                self.values[init.name] = numpy_helper.to_array(init)
        for node in graph.node:  # graph order is topological
            if node.op_type == "Constant":
                self.update(node.output)
                value = _attr(node, "value")
                if value is not None and _numel(value.dims) <= 16:
                    self.values[node.output[0]] = numpy_helper.to_array(value)
                for key in ("value_int", "value_ints"):
                    v = _attr(node, key)
                    if v is not None:
                        self.values[node.output[0]] = v
            elif (node.op_type not in ("Shape", "Size", "RandomNormal", "RandomUniform")
                  and node.input and all(i in self for i in node.input)):
                self.update(node.output)

    def scalar(self, name: str) -> int | None:
        """The literal integer value of ``name`` (a 0-d or one-element constant), if known."""
        import numpy as np

        v = self.values.get(name)
        if v is None:
            return None
        arr = np.asarray(v).reshape(-1)
        return int(arr[0]) if arr.size == 1 else None


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _nodes(graph, functions: dict) -> Iterator[Any]:
    """Every node: subgraphs (If / Loop / Scan bodies) included, and a call of one of the
    model's local functions replaced by the function's nodes (the parser imports them).
    """
    for node in graph.node:
        body = functions.get((node.domain, node.op_type))
        if body is not None:
            yield from _nodes(body, {k: v for k, v in functions.items() if v is not body})
            continue
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub, functions)


def _check_opset(model, m: Matrix, result: CheckResult) -> None:
    lo, hi = m.opset
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and not lo <= imp.version <= hi:
            result.problems.append(Problem(
                "", "model", "", f"opset {imp.version} is outside the opsets TensorRT "
                f"{m.version}'s parser reads ({lo}-{hi})",
                f"export at an opset in {lo}-{hi}, or use a newer TensorRT"))


def _check_io(graph, m: Matrix, types: dict[str, int], result: CheckResult) -> None:
    allowed = set(m.data_types)
    for kind, values in (("input", graph.input), ("output", graph.output)):
        inits = {i.name for i in graph.initializer}
        for v in values:
            if v.name in inits:
                continue
            name = _OP_TYPE_NAMES.get(types.get(v.name, 0))
            full = _MODEL_TYPE_NAMES.get(name or "", name)
            if name is None and types.get(v.name):
                import onnx

                tname = onnx.TensorProto.DataType.Name(types[v.name])
                result.problems.append(Problem(
                    v.name, kind, "", f"graph {kind} {v.name!r} has type {tname}, which "
                    f"TensorRT does not support ({', '.join(m.data_types)})",
                    f"cast the {kind} to a supported type (e.g. INT32 / INT64 / FLOAT)"))
            elif full == "DOUBLE":
                result.problems.append(Problem(
                    v.name, kind, "", f"graph {kind} {v.name!r} is DOUBLE: TensorRT casts it "
                    "to FLOAT, clamping to +-FLT_MAX", "export in float32", "warning"))
            elif full and allowed and full not in allowed:
                result.problems.append(Problem(
                    v.name, kind, "", f"graph {kind} {v.name!r} has type {full}, not among "
                    f"TensorRT {m.version}'s ONNX data types", "cast it to a supported type"))


# -- node level ------------------------------------------------------------------------------------


def _check_node(node, m: Matrix, types: dict[str, int], shapes: dict, consts: _Constants,
                result: CheckResult, seen_notes: set[str]) -> None:
    name = node.name or f"<unnamed {node.op_type}>"
    domain = node.domain
    if domain not in STANDARD_DOMAINS:
        result.problems.append(Problem(
            name, node.op_type, domain, f"domain {domain!r} is not parsed by TensorRT's ONNX "
            "parser (standard ONNX ops only, plus registered plugins)",
            _DOMAIN_FIXES.get(domain, f"replace {node.op_type} by standard ONNX ops or "
                                      "register a TensorRT plugin (IPluginV3) for it")))
        return
    support = m.ops.get(node.op_type)
    if support is None or not support.supported:
        why = "not in" if support is None else "marked unsupported (N) in"
        result.problems.append(Problem(
            name, node.op_type, domain, f"{node.op_type} is {why} TensorRT {m.version}'s "
            "ONNX operator matrix",
            _OP_FIXES.get(node.op_type, f"rewrite {node.op_type} with supported ops (or a "
                                        "plugin)")
            + (f"; {support.restrictions}" if support and support.restrictions else "")))
        return
    _check_types(node, name, support, m, types, result)
    rules = m.rules.get(node.op_type, [])
    for rule in rules:
        _apply_rule(rule, node, name, types, shapes, consts, result)
    if support.restrictions and not rules and node.op_type not in seen_notes:
        seen_notes.add(node.op_type)
        result.notes.append(f"{node.op_type} (e.g. node {name!r}): {support.restrictions}")


def _data_inputs(node, m: Matrix) -> list[str]:
    spec = m.data_inputs.get(node.op_type, m.data_inputs.get("default", [0]))
    names = list(node.input) if spec == "all" else [node.input[i] for i in spec
                                                   if i < len(node.input)]
    return [n for n in names if n]


def _check_types(node, name: str, support, m: Matrix, types: dict[str, int],
                 result: CheckResult) -> None:
    if support.types is None:
        return
    values = _data_inputs(node, m)
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        out = [("output", _OP_TYPE_NAMES.get(to or 0, f"type {to}"))] if to else []
    else:
        out = []
    checked = [(v, _OP_TYPE_NAMES.get(types[v], f"type {types[v]}")) for v in values
               if v in types] + out
    for value, tname in checked:
        if tname not in support.types:
            result.problems.append(Problem(
                name, node.op_type, node.domain, f"{node.op_type} on {tname} ({value!r}) is "
                f"not supported by TensorRT {m.version} (supported: "
                f"{', '.join(support.types)})",
                f"cast {value!r} to one of {', '.join(support.types)} around the node"))
            return


def _attr(node, key: str):
    import onnx

    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return None


def _apply_rule(rule: dict, node, name: str, types: dict, shapes: dict, consts: _Constants,
                result: CheckResult) -> None:
    kind = rule["kind"]
    bad: str | None = None
    if kind == "input_rank":
        for i in rule["inputs"]:
            if i < len(node.input) and node.input[i] and node.input[i] in shapes:
                r = len(shapes[node.input[i]])
                if r != rule["rank"]:
                    bad = f"input {i} ({node.input[i]!r}) has rank {r}"
                    break
    elif kind == "inputs_absent":
        used = [n for i, n in zip(rule["inputs"], rule["names"])
                if i < len(node.input) and node.input[i]]
        bad = f"uses {', '.join(used)}" if used else None
    elif kind == "max_outputs":
        extra = [o for o in node.output[rule["n"]:] if o]
        if extra:
            labels = rule.get("names", [])
            named = [labels[i] if i < len(labels) else o for i, o in
                     enumerate(node.output[rule["n"]:]) if o]
            bad = f"has {len(extra) + rule['n']} outputs ({', '.join(named)} used)"
    elif kind == "attrs_absent":
        present = [a.name for a in node.attribute if a.name in rule["attrs"]]
        bad = f"sets {', '.join(present)}" if present else None
    elif kind == "attr_equals":
        value = _attr(node, rule["attr"])
        if isinstance(value, bytes):
            value = value.decode()
        if value is not None and value != rule["value"]:
            bad = f"{rule['attr']}={value!r}"
    elif kind == "input_constant":
        i = rule["input"]
        if i < len(node.input) and node.input[i] and node.input[i] not in consts:
            bad = f"input {i} ({node.input[i]!r}) is computed at run time"
    elif kind == "const_input_below":
        i = rule["input"]
        value = consts.scalar(node.input[i]) if i < len(node.input) else None
        if value is not None and value >= rule["limit"]:
            bad = f"K={value}"
    elif kind == "not_both":
        if _attr(node, rule["attr"]) and rule["input"] < len(node.input) \
                and node.input[rule["input"]]:
            bad = f"{rule['attr']}=1 with input {rule['input']} set"
    else:
        raise RuntimeError(f"operator_matrix.json: unknown rule kind {kind!r}")
    if bad is not None:
        result.problems.append(Problem(name, node.op_type, node.domain,
                                       f"{rule['reason']} ({bad})", rule["fix"],
                                       rule.get("severity", "error")))

