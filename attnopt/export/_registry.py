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
  * ``"onnxruntime"``: may also use ``com.microsoft`` contrib ops ONNX Runtime implements on CPU;
  * ``"tensorrt"``: standard ONNX ops TensorRT's ONNX parser accepts; ops without a
    ``"tensorrt"`` translation use their ``"onnx"`` one (``attnopt.tensorrt._lowerings``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

ONNX_TARGETS = ("onnx", "onnxruntime", "tensorrt")
OPSET = 23


class _ContribOpset:
    """``com.microsoft`` ops by attribute (``msft().MultiHeadAttention(...)``).

    onnxscript and the torch exporter resolve ops through ONNX schemas, and the onnx package has
    none for ONNX Runtime's contrib ops; the ones attnopt emits are registered here from their
    documented signatures (onnxruntime docs/ContribOperators.md).
    """

    def __init__(self) -> None:
        import onnxscript

        _register_contrib_schemas()
        self._opset = onnxscript.values.Opset("com.microsoft", 1)

    def __getattr__(self, name: str):
        return getattr(self._opset, name)


@cache
def msft() -> _ContribOpset:
    """The ``com.microsoft`` opset (ONNX Runtime contrib ops), imported lazily."""
    return _ContribOpset()


def __getattr__(name: str):
    if name == "MSFT":  # `from attnopt.export._registry import MSFT` keeps working
        return msft()
    raise AttributeError(name)

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


_ON_EXACT: dict[object, Callable[[Callable], Callable]] = {}


def translation_on_exact(op: object) -> Callable[[Callable], Callable]:
    """Register ``make(exact) -> translation`` for custom op ``op``.

    Variants that run exact attention inside (grouped kv heads, streaming heads, pruned heads)
    lower the same way everywhere except for that attention. A target whose exact lowering is
    chosen by more than the target's name (``"tensorrt"``: one ``Attention`` node or the
    decomposed pattern, by TensorRT version) builds their translations from its own
    (``attnopt.tensorrt._lowerings.table``). ``exact`` has the signature of
    ``attnopt.variants.fused.attention_onnx``: ``(q, k, v, attn_mask, is_causal, scale)``.
    """

    def wrap(make: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
        _ON_EXACT[op] = make
        return make

    return wrap


def translations_on_exact(exact: Callable) -> dict[object, Callable]:
    """Every op registered with :func:`translation_on_exact`, lowered on ``exact``."""
    return {op: make(exact) for op, make in _ON_EXACT.items()}


# name -> (inputs as (name, type var, optional), outputs likewise, attributes as (name, type))
_CONTRIB_SIGNATURES = {
    "MultiHeadAttention": (
        [("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
         ("key_padding_mask", "M", True), ("attention_bias", "T", True),
         ("past_key", "T", True), ("past_value", "T", True),
         ("past_sequence_length", "M", True), ("cache_indirection", "M", True)],
        [("output", "T", False)],  # present_key / present_value / qk are not used
        [("num_heads", "INT"), ("scale", "FLOAT"), ("unidirectional", "INT"),
         ("mask_filter_value", "FLOAT"), ("output_qk", "INT")],
    ),
    "GroupQueryAttention": (
        [("query", "T", False), ("key", "T", True), ("value", "T", True),
         ("past_key", "T", True), ("past_value", "T", True), ("seqlens_k", "M", False),
         ("total_sequence_length", "M", False), ("cos_cache", "T", True),
         ("sin_cache", "T", True), ("position_ids", "P", True), ("attention_bias", "T", True),
         ("head_sink", "T", True)],
        [("output", "T", False), ("present_key", "T", False), ("present_value", "T", False)],
        [("num_heads", "INT"), ("kv_num_heads", "INT"), ("scale", "FLOAT"),
         ("local_window_size", "INT"), ("do_rotary", "INT"), ("rotary_interleaved", "INT"),
         ("smooth_softmax", "INT"), ("softcap", "FLOAT"), ("qk_output", "INT")],
    ),
}

_TYPE_VARS = {
    "T": ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
    "M": ["tensor(int32)"],
    "P": ["tensor(int64)"],
}


@cache
def _register_contrib_schemas() -> None:
    """Register ONNX schemas for the contrib ops attnopt emits (no-op if already known)."""
    import onnx
    from onnx.defs import OpSchema

    for name, (inputs, outputs, attrs) in _CONTRIB_SIGNATURES.items():
        try:
            onnx.defs.get_schema(name, 1, "com.microsoft")
            continue
        except onnx.defs.SchemaError:
            pass

        def params(items):
            return [OpSchema.FormalParameter(
                n, t, "", param_option=OpSchema.FormalParameterOption.Optional if opt
                else OpSchema.FormalParameterOption.Single) for n, t, opt in items]

        used = {t for _, t, _ in inputs + outputs}
        schema = OpSchema(
            name, "com.microsoft", 1,
            inputs=params(inputs), outputs=params(outputs),
            type_constraints=[(t, _TYPE_VARS[t], "") for t in sorted(used)],
            attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), "",
                                           required=False) for a, t in attrs],
        )
        onnx.defs.register_schema(schema)
