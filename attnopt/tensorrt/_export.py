"""The ``target="tensorrt"`` steps of ``export_onnx``: precision, lowering, file fix-ups, check.

    model ──(fp16 / bf16: converted copy)──▶ optimize ──▶ tensorrt translation table ──▶ ONNX
    ──▶ fix-ups (one-output Attention, no unsupported default attributes, integer CumSum / Clip
        computed in a type the matrix accepts, named dynamic dims, recorded shape ranges)
    ──▶ onnx.checker ──▶ onnxruntime parity ──▶ TensorRT check
    ──▶ file + ``<name>.trt.txt`` (trtexec and polygraphy commands)

fp16 / bf16 exports carry the precision in the graph (weights and activations converted),
which is what TensorRT 11's strongly typed builds need; ONNX ``LayerNormalization`` keeps its
float32 statistics (``stash_type=1``). onnxruntime has CPU kernels for the fp16 graphs (parity is
checked at the fp16 tolerance) but not for most bf16 ops, so a bf16 export is checked
structurally only (onnx.checker, the TensorRT check, the graph's types), and says so.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnopt.errors import ConfigError, ExportError
from attnopt.tensorrt._integer_casts import cast_integer_ops
from attnopt.tensorrt._matrix import DEFAULT_VERSION, has_attention_op, matrix

log = logging.getLogger("attnopt.export")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ATTENTION_DEFAULTS = {"qk_matmul_output_mode": 0, "softcap": 0.0}


@dataclass
class TensorRTTarget:
    """What ``export_onnx`` needs to know to write a TensorRT-ready file."""

    version: str = DEFAULT_VERSION
    precision: str | None = None
    notes: list[str] = field(default_factory=list)
    opset: int | None = None  # set when the file was converted to an older opset

    def __post_init__(self) -> None:
        self.version = str(self.version)
        matrix(self.version)  # unknown versions fail here, before any work
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got "
                              f"{self.precision!r}")

    # -- before capture ----------------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module, example_inputs: Any) -> tuple[Any, Any]:
        """The model and inputs in the requested precision (a converted copy when needed)."""
        from attnopt.api import OptimizedModel
        from attnopt.verify import model_dtype

        if self.precision is None:
            return model, example_inputs
        dtype = PRECISIONS[self.precision]
        if isinstance(model, OptimizedModel):
            have = model_dtype(model.graph_module)
            if have != dtype:
                raise ConfigError(
                    f"precision={self.precision!r} but the optimized model computes in {have}: "
                    "pass the plain model (attnopt converts a copy, then optimizes it) or "
                    "optimize a model already in that dtype")
            return model, example_inputs
        have = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if have == dtype:
            return model, example_inputs
        converted = copy.deepcopy(model).to(dtype) if have is not None else model
        self.notes.append(f"precision {self.precision}: a converted copy of the model was "
                          "optimized and exported (weights and activations in "
                          f"{self.precision}; LayerNormalization statistics in float32)")
        return converted, _cast_inputs(example_inputs, dtype)

    @property
    def runs_in_onnxruntime(self) -> bool:
        """False for bf16: onnxruntime's CPU provider lacks bf16 kernels for most ops."""
        return self.precision != "bf16"

    def translation_table(self) -> dict:
        """The lowering of every attnopt op for this TensorRT version."""
        from attnopt.tensorrt import _lowerings

        return _lowerings.table(self.version)

    def attention_form(self) -> str:
        """How exact attention is written for this version (for the report)."""
        return ("one opset-23 Attention node per site (IAttention)"
                if has_attention_op(self.version) else
                "MatMul -> Add(mask) -> Softmax -> MatMul per site (TensorRT's fusion pattern, "
                "scale folded into Q)")

    # -- on the written file -----------------------------------------------------------------------

    def rewrite(self, path: Path, fast: Any, input_names: list[str], dynamic: bool,
                validated: bool) -> None:
        """Fix up the file in place (before validation) and run ``onnx.checker`` on it.

        ``validated``: onnxruntime parity will be checked on the input sets whose shapes are
        recorded as the file's ranges (otherwise only the example shapes are recorded).
        """
        import onnx

        model = onnx.load(str(path))
        _fix_attention_nodes(model.graph)
        self.notes += cast_integer_ops(model, matrix(self.version))
        sets = (fast._captured.input_sets() if dynamic and validated
                else [fast.example_inputs])
        _name_dims(model.graph, _symbol_sizes(model.graph, sets, input_names))
        ranges = _shape_ranges(model.graph, sets, input_names)
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update({
            "attnopt.tensorrt.version": self.version,
            "attnopt.tensorrt.precision": self.precision or _graph_precision(model.graph),
            "attnopt.tensorrt.shape_ranges": json.dumps(ranges["inputs"]),
            "attnopt.tensorrt.dim_ranges": json.dumps(ranges["dims"]),
            "attnopt.tensorrt.shape_ranges_verified":
                "onnxruntime parity on these shapes" if validated else
                "not run in onnxruntime (" + ("bf16" if not self.runs_in_onnxruntime else
                                              "validate=False") + "): the example shapes",
        })
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model = self._to_supported_opset(model)
        onnx.save(model, str(path))
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker rejected the TensorRT export: {e}") from e

    def _to_supported_opset(self, model):
        """Older parsers read older opsets: convert (onnx.version_converter) when needed."""
        from onnx import version_converter

        highest = matrix(self.version).opset[1]
        current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if current <= highest:
            return model
        try:
            converted = version_converter.convert_version(model, highest)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"TensorRT {self.version}'s parser reads opsets up to {highest}; "
                              f"converting the opset-{current} export failed: {e}") from e
        self.opset = highest
        self.notes.append(f"converted from opset {current} to {highest} (the newest TensorRT "
                          f"{self.version}'s parser reads)")
        return converted

    def finalize(self, path: Path) -> None:
        """The TensorRT compatibility check; an :class:`ExportError` listing every problem."""
        from attnopt.tensorrt.check import check

        result = check(path, self.version)
        if not result.ok:
            raise ExportError(f"the export is not TensorRT {self.version}-compatible "
                              f"(this is an attnopt bug or an unsupported model op):\n{result}")
        warnings = [str(p) for p in result.problems]
        self.notes += [f"TensorRT check: {w}" for w in warnings]
        self.notes.append(f"TensorRT {self.version} check passed ({result.nodes} nodes; matrix "
                          f"{result.matrix_version})")

    def write_commands(self, path: Path) -> Path:
        """Write ``<name>.trt.txt`` with the trtexec and polygraphy commands next to ``path``."""
        from attnopt.tensorrt.commands import commands_path, commands_text
        from attnopt.tensorrt.engine import write_atomic

        out = commands_path(path)
        write_atomic(out, commands_text(path).encode())
        self.notes.append(f"trtexec / polygraphy commands: {out}")
        return out


def _cast_inputs(example_inputs: Any, dtype: torch.dtype) -> Any:
    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    if isinstance(example_inputs, dict):
        return {k: cast(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(cast(x) for x in example_inputs)
    return cast(example_inputs)


def _fix_attention_nodes(graph) -> None:
    """Drop default-valued attributes TensorRT documents as unsupported, and unused outputs."""
    import onnx

    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        keep = [a for a in node.attribute
                if not (a.name in _ATTENTION_DEFAULTS
                        and onnx.helper.get_attribute_value(a) == _ATTENTION_DEFAULTS[a.name])]
        del node.attribute[:]
        node.attribute.extend(keep)
        while len(node.output) > 1 and node.output[-1] not in used:
            node.output.pop()


def _name_dims(graph, sizes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Give the exporter's dim symbols (``s53``) readable names, the same across the graph.

    Axis 0 of an input is ``batch_size``; axis 1 of a token input is ``sequence_length``
    (``decoder_sequence_length`` for ``decoder_*`` inputs); other dynamic axes are named after
    their input and axis. Two symbols get the same name only when they had the same size in
    every validated input set (``sizes``: symbol → sizes); names that are not exporter symbols
    are kept.
    """
    import re

    mapping: dict[str, str] = {}
    owner: dict[str, tuple[int, ...] | None] = {}  # name -> the sizes of the symbols it names
    for v in graph.input:
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            sym = d.dim_param
            if not sym or sym in mapping or not re.fullmatch(r"s\d+", sym):
                continue
            if axis == 0:
                want = "batch_size"
            elif axis == 1:
                want = ("decoder_sequence_length" if v.name.startswith("decoder")
                        else "sequence_length")
            else:
                want = f"{v.name}_dim{axis}"
            name, i = want, 2
            while name in owner and (owner[name] is None or owner[name] != sizes.get(sym)):
                name, i = f"{want}_{i}", i + 1
            mapping[sym] = name
            owner.setdefault(name, sizes.get(sym))
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]
    return mapping


def _symbol_sizes(graph, sets: list, input_names: list[str]) -> dict[str, tuple[int, ...]]:
    """Each input dim symbol's size in every input set (symbol → one size per set)."""
    feeds = [_input_shapes(input_names, s) for s in sets]
    out: dict[str, tuple[int, ...]] = {}
    for v in graph.input:
        if v.name not in feeds[0]:
            continue
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_param:
                out.setdefault(d.dim_param, tuple(f[v.name][axis] for f in feeds))
    return out


def _shape_ranges(graph, sets: list, input_names: list[str]) -> dict:
    """Min / opt / max of every graph input over the input sets the export validates on.

    ``opt`` is the example inputs' shape; min / max span the example and resized inputs.
    """
    shapes = [_input_shapes(input_names, s) for s in sets]
    inputs = {}
    dims: dict[str, dict[str, int]] = {}
    for v in graph.input:
        if v.name not in shapes[0]:
            continue
        per = [s[v.name] for s in shapes]
        lo = [min(p[i] for p in per) for i in range(len(per[0]))]
        hi = [max(p[i] for p in per) for i in range(len(per[0]))]
        inputs[v.name] = {"min": lo, "opt": per[0], "max": hi}
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_param:
                dims.setdefault(d.dim_param, {"min": lo[axis], "opt": per[0][axis],
                                              "max": hi[axis]})
    return {"inputs": inputs, "dims": dims}


def _input_shapes(input_names: list[str], inputs: Any) -> dict[str, list[int]]:
    """ONNX input name → shape, matched to the inputs as ``ExportResult.feed`` matches them
    (by keyword, else in order); shapes only, so any dtype (bf16 too) works.
    """
    import torch.utils._pytree as pytree

    named = {k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}
    if all(n in named for n in input_names):
        chosen = [named[n] for n in input_names]
    else:
        leaves = [x for x in pytree.tree_leaves(inputs.args) if isinstance(x, torch.Tensor)]
        chosen = (leaves + list(named.values()))[: len(input_names)]
    return {n: list(t.shape) for n, t in zip(input_names, chosen)}


def _graph_precision(graph) -> str:
    """fp16 / bf16 / fp32: the type of the floating graph outputs (fp32 when none)."""
    kinds = {o.type.tensor_type.elem_type for o in graph.output}
    return "fp16" if 10 in kinds else "bf16" if 16 in kinds else "fp32"
