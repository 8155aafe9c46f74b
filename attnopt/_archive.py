"""Save and load optimized models: one ``torch.export`` archive (``.pt2``) with attnopt's data.

The archive is what ``torch.export.save`` writes for the rewritten graph (parameters and fitted
variant state, e.g. learned feature maps, are its buffers), plus extra files:
``attnopt.json`` (format version, report, config, call contract, capture facts) and
``attnopt_inputs.pt`` (the example inputs, base64 of ``torch.save``; loaded with
``weights_only=True``). ``torch.export.load`` opens it too, once attnopt's ops are registered.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import importlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

import attnopt.variants  # noqa: F401 - registers attnopt's ops before a program is loaded
from attnopt._call import CallSpec
from attnopt._inputs import Inputs
from attnopt.capture import Captured
from attnopt.config import Config
from attnopt.errors import ConfigError
from attnopt.optimized import OptimizedModel

FORMAT = "attnopt-archive"
VERSION = 1
_META = "attnopt.json"
_INPUTS = "attnopt_inputs.pt"
#: modules whose dataclasses / enums a report may contain (nothing else is rebuilt on load).
_TRUSTED = ("attnopt.",)


def save(model: OptimizedModel, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (a ``.pt2`` archive), atomically.

    Args:
        model: what ``attnopt.optimize`` returned (or ``attnopt.load``).
        path: the file to write; its directory must exist. Nothing is left at ``path`` when
            saving fails.

    Returns:
        The path written.

    Raises:
        ConfigError: ``model`` is not an optimized model, or ``path`` cannot be written.
    """
    if not isinstance(model, OptimizedModel):
        raise ConfigError(f"attnopt.save takes what attnopt.optimize returned, got "
                          f"{type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass a file path such as {path / 'model.pt2'}")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    program = model.exported_program()
    cap = model._captured
    meta = {
        "format": FORMAT, "version": VERSION, "attnopt": _version(),
        "report": _encode(model.report), "config": model.config.to_dict(),
        "call": model._call.to_dict(), "dynamic": cap.dynamic, "notes": list(cap.notes),
    }
    buf = io.BytesIO()
    torch.save({"inputs": _plain(cap.inputs),
                "alt_inputs": None if cap.alt_inputs is None else _plain(cap.alt_inputs)}, buf)
    extra = {_META: json.dumps(meta), _INPUTS: base64.b64encode(buf.getvalue()).decode()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp, extra_files=extra)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | os.PathLike) -> OptimizedModel:
    """Read a model written by :func:`save`; it computes what the saved model computed.

    Raises:
        ConfigError: ``path`` does not exist, or is not an attnopt archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no attnopt archive at {path}: the file does not exist")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not an attnopt archive (not a torch.export .pt2 file); "
                          "write one with attnopt.save(fast, path)")
    extra = {_META: "", _INPUTS: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign archive
        raise ConfigError(f"{path} could not be read as a torch.export archive: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if not extra[_META]:
        raise ConfigError(f"{path} is a torch.export archive but not an attnopt one (no "
                          f"{_META}): load it with torch.export.load")
    meta = json.loads(extra[_META])
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ConfigError(f"{path}: unsupported attnopt archive format "
                          f"{meta.get('format')!r} version {meta.get('version')!r}")
    data = torch.load(io.BytesIO(base64.b64decode(extra[_INPUTS])), weights_only=True)
    inputs = Inputs(tuple(data["inputs"][0]), dict(data["inputs"][1]))
    alt = data["alt_inputs"]
    alt = None if alt is None else Inputs(tuple(alt[0]), dict(alt[1]))
    gm = program.module()
    call = CallSpec.from_dict(meta["call"])
    captured = Captured(program, gm, inputs, alt, meta["dynamic"], None, dict(call.injected),
                        list(meta["notes"]))
    report = _decode(meta["report"])
    model = OptimizedModel(gm, captured, report, Config.from_dict(meta["config"]), call)
    model._program = program
    return model


# -- plain data --------------------------------------------------------------------------------


def _plain(inputs: Inputs) -> tuple[tuple, dict]:
    return tuple(inputs.args), dict(inputs.kwargs)


def _version() -> str:
    import attnopt

    return attnopt.__version__


def _encode(obj: Any) -> Any:
    """JSON data for a report: dataclasses by qualified name; handles to graphs are dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        data = {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.compare and f.init}
        return {"__dataclass__": f"{type(obj).__module__}:{type(obj).__qualname__}", **data}
    if isinstance(obj, enum.Enum):
        return {"__enum__": f"{type(obj).__module__}:{type(obj).__qualname__}",
                "value": _encode(obj.value)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x) for x in obj]
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, (frozenset, set)):
        return {"__set__": [_encode(x) for x in sorted(obj, key=repr)],
                "frozen": isinstance(obj, frozenset)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)  # not data (e.g. a dtype): its text, as the report shows it


def _decode(data: Any) -> Any:
    if isinstance(data, list):
        return [_decode(x) for x in data]
    if not isinstance(data, dict):
        return data
    if "__tuple__" in data:
        return tuple(_decode(x) for x in data["__tuple__"])
    if "__dict__" in data:
        return {_decode(k): _decode(v) for k, v in data["__dict__"]}
    if "__set__" in data:
        items = [_decode(x) for x in data["__set__"]]
        return frozenset(items) if data["frozen"] else set(items)
    if "__enum__" in data:
        return _trusted(data["__enum__"])(_decode(data["value"]))
    if "__dataclass__" in data:
        cls = _trusted(data["__dataclass__"])
        return cls(**{k: _decode(v) for k, v in data.items() if k != "__dataclass__"})
    raise ConfigError("malformed attnopt archive: unexpected report data")


def _trusted(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(_TRUSTED):
        raise ConfigError(f"malformed attnopt archive: report refers to {name}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj

