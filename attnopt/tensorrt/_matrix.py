"""The versioned ONNX-TensorRT operator matrix (``operator_matrix.json``), resolved per version.

A derived version is its base's matrix with the release-note deltas applied; every resolved
matrix keeps the source it came from so the check can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from attnopt.errors import ConfigError

DATA = Path(__file__).with_name("operator_matrix.json")
#: the TensorRT version attnopt targets when none is given.
DEFAULT_VERSION = "11.4"
#: first TensorRT whose ONNX parser maps the standard ``Attention`` op to ``IAttention``.
ATTENTION_OP_SINCE = (10, 14)


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix."""

    supported: bool
    types: tuple[str, ...] | None  # None: not documented, not checked
    restrictions: str = ""


@dataclass(frozen=True)
class Matrix:
    """The operator matrix of one TensorRT version."""

    version: str
    opset: tuple[int, int]
    data_types: tuple[str, ...]
    ops: dict[str, OpSupport]
    sources: tuple[dict[str, Any], ...]
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    data_inputs: dict[str, Any] = field(default_factory=dict)

    def source_text(self) -> str:
        """Where this matrix comes from (one line per source, base first)."""
        lines = []
        for s in self.sources:
            where = s.get("branch") or ""
            lines.append(f"{s['version']}: {s['basis']} {s['url']}"
                         + (f" ({where})" if where else "")
                         + (f"; {s['note']}" if s.get("note") else ""))
        return "\n".join(lines)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


@cache
def _raw() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def known_versions() -> list[str]:
    """The TensorRT versions the data file covers, oldest first."""
    return sorted(_raw()["versions"], key=_key)


def parse_version(version: str) -> tuple[int, ...]:
    """``"11.4"``, ``"11.4.0"`` or ``"11.4.0.106"`` → ``(11, 4, ...)``; ConfigError otherwise."""
    text = str(version).strip()
    try:
        parts = tuple(int(x) for x in text.split("."))
    except ValueError:
        parts = ()
    if len(parts) < 2:
        raise ConfigError(f"TensorRT version {version!r} is not a version like '11.4' or "
                          f"'10.15.1'; known: {', '.join(known_versions())}")
    return parts


def resolve_version(version: str) -> str:
    """The data file's entry for ``version``: the newest entry <= it within the same major."""
    parts = parse_version(version)
    same_major = [v for v in known_versions()
                  if _key(v)[0] == parts[0] and _key(v) <= parts[:2]]
    if not same_major:
        raise ConfigError(f"no ONNX-TensorRT operator matrix for TensorRT {version}: known "
                          f"versions are {', '.join(known_versions())} (older TensorRT parsers "
                          "cannot read the opset-23 files attnopt writes)")
    return same_major[-1]


@cache
def matrix(version: str = DEFAULT_VERSION) -> Matrix:
    """The resolved matrix for ``version`` (see :func:`resolve_version`)."""
    name = resolve_version(version)
    raw = _raw()
    chain = []
    v: str | None = name
    while v is not None:
        entry = raw["versions"][v]
        chain.append((v, entry))
        v = entry.get("base")
    opset: list[int] | None = None
    dtypes: list[str] = []
    ops: dict[str, OpSupport] = {}
    sources = []
    for v, entry in reversed(chain):  # base first
        if "ops" in entry:
            ops = {k: OpSupport(o["supported"],
                                None if o["types"] is None else tuple(o["types"]),
                                o.get("restrictions", ""))
                   for k, o in entry["ops"].items()}
            dtypes = entry.get("data_types", dtypes)
        for k in entry.get("remove", []):
            ops.pop(k, None)
        for k, o in entry.get("add", {}).items():
            ops[k] = OpSupport(True, None if o["types"] is None else tuple(o["types"]),
                               o.get("restrictions", ""))
        for k, text in entry.get("restrictions", {}).items():
            if k in ops:
                ops[k] = OpSupport(ops[k].supported, ops[k].types, text)
        opset = entry.get("opset", opset)
        sources.append({"version": v, **entry["source"]})
    if opset is None:
        raise RuntimeError(f"{DATA.name}: TensorRT {name} has no opset range (data file broken)")
    return Matrix(version=name, opset=(opset[0], opset[1]), data_types=tuple(dtypes), ops=ops,
                  sources=tuple(sources), rules=raw.get("rules", {}),
                  data_inputs=raw.get("data_input_indices", {}))


def has_attention_op(version: str) -> bool:
    """True when TensorRT ``version``'s parser maps ONNX ``Attention`` (opset 23) to IAttention."""
    return parse_version(version)[:2] >= ATTENTION_OP_SINCE
