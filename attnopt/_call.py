"""The call contract of an optimized model: user call → the captured graph's (args, kwargs).

The graph was captured for one call structure: some arguments positional, some by keyword, the
others left to their defaults; non-tensor arguments (``use_cache=False``) were baked in as
constants. A :class:`CallSpec` binds any call the original ``forward`` accepts with
``inspect.signature`` and maps it onto that structure, or raises :class:`CallError` naming the
argument and what to do.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt._inputs import Inputs
from attnopt.errors import CallError

_P = inspect.Parameter
#: stands for a default that is not JSON data (it cannot be compared after a load).
_OPAQUE = "<default not serialisable>"


@dataclass
class CallSpec:
    """How calls map onto the captured graph.

    Attributes:
        params: the original forward's parameters: ``(name, kind, has_default, default)``.
        positional: names captured positionally, in order.
        keywords: names captured by keyword, in the graph's order.
        constants: captured arguments that are not tensors (baked into the graph), by name.
        injected: keyword arguments attnopt added at capture (``use_cache=False``).
    """

    params: list[tuple[str, str, bool, Any]]
    positional: list[str]
    keywords: list[str]
    constants: dict[str, Any] = field(default_factory=dict)
    injected: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_capture(cls, forward: Any, inputs: Inputs, injected: dict[str, Any]) -> CallSpec:
        """The spec of a model's ``forward`` captured on ``inputs``."""
        try:
            sig = inspect.signature(forward)
        except (TypeError, ValueError):
            sig = None
        params = []
        if sig is not None:
            for p in sig.parameters.values():
                has = p.default is not _P.empty
                params.append((p.name, p.kind.name, has, _jsonable(p.default) if has else None))
        names = [n for n, kind, _, _ in params if kind in ("POSITIONAL_ONLY",
                                                            "POSITIONAL_OR_KEYWORD")]
        has_varargs = any(kind == "VAR_POSITIONAL" for _, kind, _, _ in params)
        if sig is None or (len(inputs.args) > len(names) and not has_varargs):
            params = []  # unknown signature: calls are passed through as captured
        positional = names[:len(inputs.args)] if params else []
        constants = {k: v for k, v in inputs.kwargs.items() if _is_constant(v)}
        constants.update({n: a for n, a in zip(positional, inputs.args) if _is_constant(a)})
        return cls(params, positional, list(inputs.kwargs), constants, dict(injected))

    # -- binding -----------------------------------------------------------------------------

    def signature(self) -> inspect.Signature | None:
        """The original forward's signature (opaque defaults stand for unserialisable ones)."""
        if not self.params:
            return None
        return inspect.Signature([_P(n, getattr(_P, kind), default=d if has else _P.empty)
                                  for n, kind, has, d in self.params])

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Map a call onto the captured structure.

        Raises:
            CallError: an argument the original forward does not take, a value for an argument
                captured as a constant, a tensor argument left out, or a non-default value for
                an argument that was not captured.
        """
        sig = self.signature()
        if sig is None:
            return args, {**self.injected, **kwargs}
        try:
            given = sig.bind_partial(*args, **kwargs).arguments
            full = sig.bind(*args, **{**{k: v for k, v in self.injected.items()
                                        if k not in given}, **kwargs})
        except TypeError as e:
            raise CallError(f"the optimized model takes the original forward's arguments "
                            f"{self._describe(sig)}: {e}") from None
        full.apply_defaults()
        values = full.arguments
        captured = set(self.positional) | set(self.keywords)
        for p in sig.parameters.values():
            if p.name in captured:
                self._check_captured(p.name, values.get(p.name))
            else:
                self._check_default(p, values.get(p.name, p.default))
        return (tuple(values[n] for n in self.positional),
                {n: values[n] for n in self.keywords})

    def _check_captured(self, name: str, value: Any) -> None:
        if name in self.constants:
            want = self.constants[name]
            if not _same(value, want):
                fix = (f"call with {name}={want!r} or leave it out (attnopt sets it: the graph "
                       "cannot hold a cache object)" if name in self.injected else
                       f"call with {name}={want!r}, or optimize again with {name}={value!r} in "
                       "the example inputs")
                raise CallError(
                    f"argument {name!r} was captured as the constant {want!r} (it is baked into "
                    f"the optimized graph); got {_short(value)}: {fix}", argument=name)
        elif value is None:
            raise CallError(
                f"argument {name!r} was captured as a tensor and is missing (or None) in this "
                f"call: pass it, or optimize again with example inputs that leave it out",
                argument=name)

    def _check_default(self, p: inspect.Parameter, value: Any) -> None:
        if p.kind is _P.VAR_POSITIONAL and value in ((), None):
            return
        if p.kind is _P.VAR_KEYWORD:
            passed = [k for k, v in (value or {}).items() if v is not None]
            if passed:
                extra = passed[0]
                raise CallError(
                    f"argument {extra!r} was not in the example inputs, so the graph was "
                    f"captured without it; optimize again with {extra} in the example inputs "
                    "to pass it", argument=extra)
            return
        if p.default is not _P.empty and (p.default == _OPAQUE or _same(value, p.default)):
            return
        raise CallError(
            f"argument {p.name!r} was not in the example inputs, so the graph was captured with "
            f"its default ({'none' if p.default is _P.empty else repr(p.default)}); got "
            f"{_short(value)}. Optimize again with {p.name} in the example inputs to pass it",
            argument=p.name)

    def _describe(self, sig: inspect.Signature) -> str:
        return str(sig)

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON data (constants are JSON scalars)."""
        return {"params": [list(p) for p in self.params], "positional": self.positional,
                "keywords": self.keywords, "constants": self.constants,
                "injected": self.injected}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallSpec:
        """Rebuild from :meth:`to_dict`."""
        return cls([tuple(p) for p in data["params"]], list(data["positional"]),
                   list(data["keywords"]), dict(data["constants"]), dict(data["injected"]))


def check_tensors(flat: list[Any], placeholders: list[Any], paths: list[str],
                  float_dtype: torch.dtype | None = None) -> None:
    """Dtype and rank of each tensor input against the captured graph's placeholders.

    ``float_dtype``: the dtype floating-point inputs must have after a dtype move.
    """
    for x, val, where in zip(flat, placeholders, paths):
        if not isinstance(val, torch.Tensor):
            continue
        if float_dtype is not None and val.is_floating_point():
            val = val.to(float_dtype)
        if not isinstance(x, torch.Tensor):
            raise CallError(f"input {where} must be a tensor (captured as {_short(val)}), got "
                            f"{_short(x)}", argument=where)
        if x.dtype != val.dtype or x.dim() != val.dim():
            raise CallError(
                f"input {where}: the graph was captured for a {val.dim()}-D {val.dtype} tensor, "
                f"got {_short(x)}; convert it (or optimize again with such example inputs)",
                argument=where)


def leaf_paths(args: tuple, kwargs: dict[str, Any], names: list[str]) -> list[str]:
    """Readable names of the flat leaves of ``(args, kwargs)``."""
    out = []
    for i, a in enumerate(args):
        base = names[i] if i < len(names) else f"args[{i}]"
        out += [base + pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(a)[0]]
    for k, v in kwargs.items():
        out += [k + pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(v)[0]]
    return out


def guard_error(err: Exception) -> CallError | None:
    """A :class:`CallError` for a failed input guard of an exported graph (None otherwise)."""
    text = str(err)
    if isinstance(err, AssertionError) and "Guard failed" in text:
        cond = text.split("Guard failed:", 1)[1].strip()
        return CallError(
            f"the inputs are outside what the graph was captured for: {cond} does not hold. "
            "Sizes must stay in the captured dynamic ranges (a dimension that was static must "
            "keep its example size); optimize again with example inputs of that shape",
            argument=cond.split(".")[0].split("[")[0].split()[0])
    if isinstance(err, RuntimeError) and text.startswith("Expected input at"):
        return CallError(f"the inputs are outside what the graph was captured for: {text}. "
                         "Optimize again with example inputs of that shape")
    return None


def _is_constant(x: Any) -> bool:
    leaves = pytree.tree_leaves(x)
    return not any(isinstance(t, torch.Tensor) for t in leaves)


def _jsonable(x: Any) -> Any:
    try:
        return x if json.loads(json.dumps(x)) == x else _OPAQUE
    except (TypeError, ValueError):
        return _OPAQUE


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool
        return False


def _short(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {tuple(x.shape)} {x.dtype} tensor"
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."
