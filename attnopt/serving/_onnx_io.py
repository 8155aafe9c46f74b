"""Inputs and outputs of an ONNX file in Triton's terms: name → (``TYPE_*``, dims with -1)."""

from __future__ import annotations

from pathlib import Path

from attnopt.errors import ConfigError

# onnx.TensorProto.DataType value → Triton DataType name
_TRITON_TYPES = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
    6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
    11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16",
}

TensorIO = dict[str, tuple[str, list[int]]]


def model_io(path: str | Path) -> dict[str, TensorIO]:
    """``{"input": {name: (TYPE_*, dims)}, "output": {...}}`` of an ONNX file.

    Dims are the full shapes (batch included); a named or unknown dim is -1. Initializers that
    are also listed as graph inputs (old exporters) are not inputs.

    Raises:
        ConfigError: the file cannot be read as ONNX, or a tensor has a type Triton lacks.
    """
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - any reader failure means "not an ONNX file"
        raise ConfigError(f"cannot read {path} as an ONNX model: {e}") from e
    initializers = {t.name for t in graph.initializer}
    out: dict[str, TensorIO] = {"input": {}, "output": {}}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            if tt.elem_type not in _TRITON_TYPES:
                raise ConfigError(f"{kind} {v.name!r} of {path} has ONNX element type "
                                  f"{tt.elem_type}, which Triton has no data type for")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                    for d in tt.shape.dim]
            out[kind][v.name] = (_TRITON_TYPES[tt.elem_type], dims)
    return out


def external_data_files(path: str | Path) -> list[str]:
    """Relative locations of the external-data files an ONNX file refers to (large models)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)
