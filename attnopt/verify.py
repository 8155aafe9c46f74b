"""Numerical verification: compare tensors, sites and whole models; default tolerances.

The error of a rewrite is ``max|out - ref| / max|ref|`` (max abs difference relative to the
reference's scale), computed in float64 over every tensor leaf of the outputs.

NaN in the reference: attention over a row whose keys are all masked is 0/0 in the original
code (a fully padded sequence), so the original outputs NaN there, while fused kernels return a
finite value. Those elements carry nothing a caller can use, so they are excluded from the
error and counted (``ErrorStats.nan_in_reference``, shown in reports): a rewrite is not
reverted for giving a number where the original gave NaN. The reverse, NaN in the output where
the reference is finite, is an infinite error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Interpreter, Node

# Exact rewrites: max abs error relative to the output's scale.
DEFAULT_TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


def default_tolerance(dtype: torch.dtype | None) -> float:
    """The default tolerance of an exact rewrite for computations in ``dtype``."""
    return DEFAULT_TOLERANCE.get(dtype, 1e-4)


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@dataclass(frozen=True)
class ErrorStats:
    """How far an output is from its reference.

    Attributes:
        rel: max abs difference / max abs reference (the number compared with tolerances).
        max_abs: max abs difference.
        cosine: cosine similarity of the flattened tensors (1.0 = same direction).
        nan_in_reference: elements that are NaN in the reference but not in the output
            (excluded from the other numbers; see the module docstring).
    """

    rel: float
    max_abs: float
    cosine: float
    nan_in_reference: int = 0

    def to_dict(self) -> dict[str, float]:
        """Plain data for reports."""
        return {"rel": self.rel, "max_abs": self.max_abs, "cosine": self.cosine,
                "nan_in_reference": self.nan_in_reference}


ZERO = ErrorStats(0.0, 0.0, 1.0)


def compare(ref: Any, out: Any) -> ErrorStats:
    """Error of ``out`` against ``ref`` (tensors or pytrees of tensors, same structure)."""
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    out_leaves, out_spec = pytree.tree_flatten(out)
    if len(ref_leaves) != len(out_leaves):
        raise ValueError(f"outputs differ in structure: {ref_spec} vs {out_spec}")
    worst = ZERO
    for a, b in zip(ref_leaves, out_leaves):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            s = _tensor_error(a, b)
        elif a == b:
            s = ZERO
        else:
            s = ErrorStats(math.inf, math.inf, 0.0)
        worst = ErrorStats(max(worst.rel, s.rel), max(worst.max_abs, s.max_abs),
                           min(worst.cosine, s.cosine),
                           worst.nan_in_reference + s.nan_in_reference)
    return worst


def _tensor_error(ref: torch.Tensor, out: torch.Tensor) -> ErrorStats:
    if ref.shape != out.shape:
        return ErrorStats(math.inf, math.inf, 0.0)
    if not ref.is_floating_point():
        same = bool(torch.equal(ref, out))
        return ZERO if same else ErrorStats(math.inf, math.inf, 0.0)
    a, b = ref.detach().double(), out.detach().double()
    ref_nan = torch.isnan(a)
    nan_only_in_ref = int((ref_nan & ~torch.isnan(b)).sum())
    a = torch.where(ref_nan, 0.0, a)
    b = torch.where(ref_nan, 0.0, b)
    if a.numel() == 0:
        return ZERO
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    rel = diff / scale if scale > 0 else diff
    if math.isnan(rel):
        rel = math.inf
    na, nb = a.norm().item(), b.norm().item()
    cos = 1.0 if na == nb == 0 else (a.flatten() @ b.flatten()).item() / max(na * nb, 1e-300)
    return ErrorStats(rel, diff, cos, nan_only_in_ref)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def record(gm: GraphModule, flat_inputs: list, nodes: set[Node]) -> dict[Node, Any]:
    """Run ``gm`` on flat inputs and keep the values of ``nodes``."""
    rec = _Recorder(gm, nodes)
    with torch.no_grad():
        rec.run(*flat_inputs)
    return rec.values
