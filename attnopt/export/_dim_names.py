"""Readable names for the dynamic dims of an exported ONNX graph: ``s53`` → ``sequence_length``.

torch.export names every dynamic dim after a sympy symbol (``s11``, ``s53``), and two inputs
that torch could not prove equal (``input_ids`` and ``attention_mask`` batches) get different
symbols. Runtimes and users read these names, so each symbol is renamed after the input and
axis it first appears in:

  * axis 0 of every input: ``batch_size`` (shared by all inputs: they are one batch);
  * axis 1 of token inputs (ids, masks, positions) and of ``[B, L, E]`` inputs:
    ``sequence_length``, or ``decoder_sequence_length`` for ``decoder_*`` inputs;
  * axes 2 / 3 of image inputs: ``height`` / ``width``;
  * anything else: ``<input>_dim<axis>``.

A non-batch name already taken by another symbol gets the input's name as a prefix, so two
independent lengths never share a name. Expressions over symbols (``s53 + 1``) are rewritten
with the new names; symbols that appear in no input are left as they are.
"""

from __future__ import annotations

import re
from typing import Any

_SYMBOL = re.compile(r"\b[su]\d+\b")
_TOKEN_INPUT = re.compile(r"ids|mask|position|token_type", re.IGNORECASE)
_IMAGE_INPUT = re.compile(r"pixel|image", re.IGNORECASE)


def axis_name(input_name: str, axis: int, rank: int) -> str:
    """The readable name of ``input_name``'s dynamic ``axis`` (see the module docstring)."""
    if axis == 0:
        return "batch_size"
    decoder = "decoder_" if input_name.startswith("decoder") else ""
    if axis == 1 and (_TOKEN_INPUT.search(input_name) or rank == 3):
        return f"{decoder}sequence_length"
    if _IMAGE_INPUT.search(input_name) and rank == 4 and axis in (2, 3):
        return ("height", "width")[axis - 2]
    return f"{input_name}_dim{axis}"


def rename_dynamic_dims(model: Any) -> dict[str, str]:
    """Rename the symbolic dims of an ``onnx_ir`` model in place; returns old → new names."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    owner: dict[str, str] = {}  # new name → the symbol holding it
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                continue
            old = str(dim.value)
            if old in mapping or not _SYMBOL.fullmatch(old):
                continue
            new = axis_name(value.name or "input", axis, len(value.shape))
            if axis != 0 and owner.get(new, old) != old:
                new = f"{value.name}_{new}"
            owner.setdefault(new, old)
            mapping[old] = new
    if not mapping:
        return mapping

    def rename(shape):
        dims = []
        for d in shape:
            if isinstance(d, ir.SymbolicDim) and d.value is not None:
                text = _SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), str(d.value))
                d = ir.SymbolicDim(text)
            dims.append(d)
        return ir.Shape(dims)

    values = [*model.graph.inputs, *model.graph.outputs]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values += list(node.outputs)
    for value in values:
        if value.shape is not None:
            value.shape = rename(value.shape)
    return mapping
