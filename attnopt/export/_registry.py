"""ONNX translations of attnopt custom ops, registered per export target.

Each variant module registers how its op lowers for each target::

    @onnx_translation(torch.ops.attnopt.sliding_window.default, "onnx", "onnxruntime")
    def _sliding_window(q, k, v, attn_mask, window: int, ...):
        ...  # onnxscript ops: ``from onnxscript import opset23 as op``; contrib ops via MSFT

The functions are passed to ``torch.onnx.export(..., custom_translation_table=...)``: tensor
arguments arrive as onnxscript values, non-tensor arguments as Python values (use them as
attributes). A new variant adds its translations in its own module; the exporter needs no change.

Targets:
  * ``"onnx"``: standard ONNX ops only, opset 23 (``Attention`` where it fits);
  * ``"onnxruntime"``: may also use ``com.microsoft`` contrib ops ONNX Runtime implements on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import onnxscript

ONNX_TARGETS = ("onnx", "onnxruntime")
OPSET = 23
MSFT = onnxscript.values.Opset("com.microsoft", 1)

_TRANSLATIONS: dict[tuple[object, str], Callable] = {}


def onnx_translation(op: object, *targets: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the ONNX translation of custom op ``op`` for ``targets``."""
    unknown = [t for t in targets if t not in ONNX_TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets must be among {ONNX_TARGETS}, got {targets}")

    def wrap(fn: Callable) -> Callable:
        for t in targets:
            _TRANSLATIONS[(op, t)] = fn
        return fn

    return wrap


def translation_table(target: str) -> dict[object, Callable]:
    """All registered translations for ``target``, keyed by op overload."""
    return {op: fn for (op, t), fn in _TRANSLATIONS.items() if t == target}
