"""Triton's model-configuration schema: ``config.pbtxt`` text → checked ``ModelConfig`` message.

Two layers of checks:

1. **Triton's own schema.** ``tritonclient`` ships the generated protobuf module of Triton's
   ``model_config.proto`` (``tritonclient/grpc/model_config_pb2.py``); parsing the text with
   ``google.protobuf.text_format`` rejects what Triton's parser rejects: unknown (misspelled)
   fields, unknown enum values, wrong value types.
2. **Meaning the schema cannot express** (:func:`check_semantics`): a model name, one platform or
   backend, ``max_batch_size`` consistent with the batching options and with the dims, and the
   tensors' names, data types and dims equal to those of the model file.

The generated module is loaded from its file, not as ``tritonclient.grpc.model_config_pb2``: the
``tritonclient.grpc`` package imports grpcio, which the schema does not need.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

from attnopt.errors import ConfigError

_MODULE = "attnopt.serving._model_config_pb2"


def model_config_module() -> ModuleType:
    """Triton's generated ``model_config_pb2`` module (from the installed ``tritonclient``)."""
    if "tritonclient.grpc.model_config_pb2" in sys.modules:
        return sys.modules["tritonclient.grpc.model_config_pb2"]
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("validating a Triton config needs Triton's schema from the tritonclient "
                          "package: pip install --no-deps tritonclient==2.73.0 "
                          "(requirements/triton_schema.txt)")
    for root in spec.submodule_search_locations:
        path = f"{root}/grpc/model_config_pb2.py"
        try:
            file_spec = importlib.util.spec_from_file_location(_MODULE, path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        except FileNotFoundError:
            continue
        sys.modules[_MODULE] = module
        return module
    raise ConfigError("the installed tritonclient has no grpc/model_config_pb2.py (Triton's "
                      "model-configuration schema); install tritonclient==2.73.0")


def parse_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``config.pbtxt`` text into Triton's ``inference.ModelConfig``.

    Raises:
        ConfigError: the text does not follow Triton's schema; the message has the line and
            column, the offending field or value, and the fix when the field is a near miss.
    """
    from google.protobuf import text_format

    mc = model_config_module()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{where} does not follow Triton's model-configuration schema "
                          f"(model_config.proto): {e}{_suggest(str(e), mc)}") from None


def _suggest(message: str, mc: ModuleType) -> str:
    """'did you mean ...' for a misspelled field or enum value."""
    import difflib
    import re

    m = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', message)
    if m:
        names = _field_names(mc, m.group(1))
        close = difflib.get_close_matches(m.group(2), names, n=1)
        if close:
            return f"; did you mean {close[0]!r}?"
        return f"; known fields: {', '.join(sorted(names))}" if names else ""
    m = re.search(r'Enum type "([\w.]+)" has no value named (\w+)', message)
    if m:
        values = _enum_values(mc, m.group(1))
        close = difflib.get_close_matches(m.group(2), values, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        return f";{hint} allowed: {', '.join(values)}"
    return ""


def _field_names(mc: ModuleType, full_name: str) -> list[str]:
    try:
        return [f.name for f in mc.DESCRIPTOR.pool.FindMessageTypeByName(full_name).fields]
    except KeyError:
        return []


def _enum_values(mc: ModuleType, full_name: str) -> list[str]:
    try:
        return [v.name for v in mc.DESCRIPTOR.pool.FindEnumTypeByName(full_name).values]
    except KeyError:
        return []


# -- semantic checks ---------------------------------------------------------------------------

KNOWN_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
KNOWN_BACKENDS = {"onnxruntime", "tensorrt", "python"}


def check_semantics(config: Any, model_io: dict[str, dict[str, tuple[str, list[int]]]] | None,
                    where: str = "config.pbtxt", dir_name: str | None = None) -> None:
    """Checks the schema cannot make.

    Args:
        config: a parsed ``ModelConfig``.
        model_io: ``{"input": {name: (TYPE_*, dims)}, "output": {...}}`` of the model file, with
            full dims (batch included, -1 for dynamic); None skips the model-file checks.
        where: what to call the config in messages.
        dir_name: the model's directory name in the repository (Triton requires ``name`` to
            equal it).

    Raises:
        ConfigError: naming the field, what was found and what to do.
    """
    mc = model_config_module()

    def fail(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if not config.name:
        fail("'name' is empty; set it to the model directory's name")
    if dir_name is not None and config.name != dir_name:
        fail(f"name {config.name!r} differs from its directory {dir_name!r}: Triton requires "
             "them equal")
    if config.platform and config.platform not in KNOWN_PLATFORMS:
        fail(f"platform {config.platform!r} is not one attnopt writes "
             f"({', '.join(KNOWN_PLATFORMS)})")
    if config.backend and config.backend not in KNOWN_BACKENDS:
        fail(f"backend {config.backend!r} is not one of {sorted(KNOWN_BACKENDS)}")
    if not config.platform and not config.backend:
        fail("neither 'platform' nor 'backend' is set: Triton cannot pick a backend")
    if (config.platform and config.backend
            and KNOWN_PLATFORMS.get(config.platform) != config.backend):
        fail(f"platform {config.platform!r} and backend {config.backend!r} disagree")
    mbs = config.max_batch_size
    if mbs < 0:
        fail(f"max_batch_size {mbs} is negative; use 0 (no batching) or a positive limit")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            fail("dynamic_batching needs max_batch_size > 0 (it is 0: the model does not "
                 "batch)")
        for p in config.dynamic_batching.preferred_batch_size:
            if not 0 < p <= mbs:
                fail(f"preferred_batch_size {p} is outside 1..max_batch_size ({mbs})")
    for g in config.instance_group:
        if g.count < 1:
            fail(f"instance_group count {g.count} must be at least 1")
    if not config.input or not config.output:
        fail("a model needs at least one 'input' and one 'output'")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen = set()
        for t in tensors:
            if not t.name:
                fail(f"an {kind} has no name")
            if t.name in seen:
                fail(f"{kind} {t.name!r} is listed twice")
            seen.add(t.name)
            if t.data_type == mc.TYPE_INVALID:
                fail(f"{kind} {t.name!r} has no data_type")
            bad = [d for d in t.dims if d < -1 or d == 0]
            if bad:
                fail(f"{kind} {t.name!r} dims {list(t.dims)}: each dim is a positive size or -1 "
                     "(dynamic)")
    if model_io is not None:
        _check_against_model(config, model_io, fail)


def _check_against_model(config: Any, model_io: dict, fail) -> None:
    mc = model_config_module()
    mbs = config.max_batch_size
    for kind, tensors in (("input", config.input), ("output", config.output)):
        have = model_io[kind]
        names = [t.name for t in tensors]
        missing = [n for n in names if n not in have]
        if missing:
            fail(f"{kind} {missing} not in the model file, whose {kind}s are {list(have)}")
        if kind == "input" and set(names) != set(have):
            fail(f"the model file takes inputs {list(have)} but the config lists {names}; list "
                 "every input")
        for t in tensors:
            dtype, full = have[t.name]
            cfg_type = mc.DataType.Name(t.data_type)
            if cfg_type != dtype:
                fail(f"{kind} {t.name!r}: data_type {cfg_type} but the model file has {dtype}")
            dims = list(t.dims)
            if mbs > 0:
                if not full:
                    fail(f"{kind} {t.name!r} is a scalar in the model file: it has no batch "
                         "dimension; use max_batch_size: 0")
                if full[0] != -1:
                    fail(f"{kind} {t.name!r}: max_batch_size is {mbs} but the model file fixes "
                         f"its first (batch) dim to {full[0]}; export with a dynamic batch "
                         "axis or use max_batch_size: 0")
                expect = full[1:]
                if len(dims) == len(full) and dims[1:] == expect:
                    fail(f"{kind} {t.name!r} dims {dims} include the batch dimension; with "
                         f"max_batch_size > 0 Triton adds it: write dims {expect}")
            else:
                expect = full
            if dims != expect:
                fail(f"{kind} {t.name!r} dims {dims} differ from the model file's {expect} "
                     f"(model shape {full}, max_batch_size {mbs}; -1 = dynamic)")
