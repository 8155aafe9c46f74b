"""Example inputs: normalise what users pass, and derive inputs of another batch size / length.

Users pass a tuple (positional args), a dict (keyword args, as HF models take them) or a single
tensor; a list (ambiguous: one list argument or several?) and NaN-holding inputs are refused.
``check_signature`` matches them against the model's ``forward`` before capture.

Verification needs a second input whose dynamic dimensions differ from the example's; it
is made by tiling or cropping each example tensor along those dimensions, so token ids stay valid
ids and padding masks stay 0/1 patterns.
"""

from __future__ import annotations

import difflib
import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt.errors import ConfigError


@dataclass
class Inputs:
    """Positional and keyword inputs of one model call."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def flat(self, in_spec: pytree.TreeSpec | None = None) -> list[Any]:
        """Leaves in the order of the exported program's input spec."""
        kwargs = self.kwargs
        if in_spec is not None:
            order = in_spec.child(1).context if in_spec.num_children == 2 else None
            if order is not None:
                kwargs = {k: self.kwargs[k] for k in order}
        return pytree.tree_leaves((self.args, kwargs))

    def call(self, fn):
        """Call ``fn`` with these inputs."""
        return fn(*self.args, **self.kwargs)

    def describe(self) -> str:
        """Shapes of the tensor inputs, for messages."""
        parts = [_desc(a) for a in self.args] + [f"{k}={_desc(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def normalize(example_inputs: Any) -> Inputs:
    """Turn a tuple / dict / tensor of example inputs into :class:`Inputs`.

    A list is refused: ``model(*inputs)`` and ``model(inputs)`` are both plausible readings
    (HF models take lists of images, for instance). Floating-point inputs holding NaN are
    refused: every check compares outputs, and NaN inputs make those comparisons meaningless.
    """
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        inputs = Inputs(args=(example_inputs,))
    elif isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"example_inputs dict keys must be argument names, got {bad!r}")
        inputs = Inputs(kwargs=dict(example_inputs))
    elif isinstance(example_inputs, tuple):
        inputs = Inputs(args=tuple(example_inputs))
    elif isinstance(example_inputs, list):
        raise ConfigError(
            f"example_inputs is a list of {len(example_inputs)} items: pass a tuple of "
            f"positional arguments (tuple(inputs)), or (inputs,) when the model's first "
            "argument is itself a list")
    else:
        raise ConfigError(
            "example_inputs must be a tuple of positional arguments, a dict of keyword arguments "
            f"or a tensor; got {type(example_inputs).__name__}"
        )
    _check_finite(inputs)
    return inputs


def _check_finite(inputs: Inputs) -> None:
    named = [(f"argument {i}", a) for i, a in enumerate(inputs.args)]
    named += [(repr(k), v) for k, v in inputs.kwargs.items()]
    for name, value in named:
        for leaf in pytree.tree_leaves(value):
            if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
                    and not leaf.is_meta and bool(torch.isnan(leaf).any())):
                raise ConfigError(
                    f"example input {name} {_desc(leaf)} contains NaN: attnopt verifies "
                    "every rewrite by comparing outputs, which NaN inputs make meaningless; "
                    "pass finite values (-inf in additive masks is fine)")


def check_signature(model: torch.nn.Module, inputs: Inputs) -> None:
    """Check example inputs against ``model.forward``'s signature before capturing.

    Catches the user's input mistakes (a missing argument, a misspelled key, float token ids)
    with a message naming the argument and what forward expects, instead of a capture failure
    deep in the model.

    Raises:
        ConfigError: the inputs do not fit the signature.
    """
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    expects = f"{type(model).__name__}.forward{_short_signature(sig)}"
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in inputs.kwargs:
        if key in params and params[key].kind not in (params[key].VAR_POSITIONAL,
                                                       params[key].POSITIONAL_ONLY):
            continue
        close = difflib.get_close_matches(key, named, n=1, cutoff=0.75)
        if close or not takes_var_kw:
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"example_inputs key {key!r} is not an argument of {expects}"
                              f"{hint}")
    try:
        bound = sig.bind(*inputs.args, **inputs.kwargs)
    except TypeError as e:
        raise ConfigError(f"example_inputs do not fit {expects}: {e}") from None
    for name, value in bound.arguments.items():
        want = _annotated_dtype(params[name].annotation)
        if (want is not None and isinstance(value, torch.Tensor)
                and value.is_floating_point() != want.is_floating_point):
            raise ConfigError(
                f"example input {name!r} is {_desc(value)} but {expects} annotates it as "
                f"{want} ({'floating point' if want.is_floating_point else 'integer'}); "
                f"convert it, e.g. {name}.to({want})")


def input_error(err: Exception, model: torch.nn.Module, inputs: Inputs) -> ConfigError | None:
    """A ``ConfigError`` when a capture failure is the model rejecting its example inputs.

    Two cases: the model's own code raised ValueError / TypeError / KeyError (HF's "You must
    specify exactly one of input_ids or inputs_embeds"), or an embedding got float indices.
    None when the failure looks like a capture limitation instead.
    """
    try:
        sig = f"{type(model).__name__}.forward{_short_signature(inspect.signature(model.forward))}"
    except (TypeError, ValueError):
        sig = f"{type(model).__name__}.forward"
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    if "Expected tensor for argument" in first and "indices" in first:
        floats = [k for k, v in inputs.kwargs.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
        floats += [f"argument {i}" for i, v in enumerate(inputs.args)
                   if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return ConfigError(
            f"an embedding lookup got floating-point indices ({first}); token ids must be "
            f"integer tensors. Floating-point example inputs: {', '.join(floats) or 'none'} "
            f"(all inputs: {inputs.describe()}); convert the ids with .long()")
    if isinstance(err, (ValueError, TypeError, KeyError)) and _raised_in_user_code(err):
        where = traceback.extract_tb(err.__traceback__)[-1]
        return ConfigError(
            f"the model rejected the example inputs {inputs.describe()}: "
            f"{type(err).__name__}: {first} (at {where.filename}:{where.lineno}); "
            f"{sig} expects them")
    return None


def _raised_in_user_code(err: Exception) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    name = frames[-1].filename.replace("\\", "/")
    return "/torch/" not in name and "/attnopt/" not in name and not name.startswith("<")


# HF annotates ids as LongTensor; masks are annotated FloatTensor but taken as int too, so
# only integer annotations are checked.
_ANNOTATED = {"LongTensor": torch.int64, "IntTensor": torch.int32}


def _annotated_dtype(annotation: Any) -> torch.dtype | None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if not isinstance(text, str) or not text:
        text = str(annotation)
    for name, dtype in _ANNOTATED.items():
        if name in text:
            return dtype
    return None


def _short_signature(sig: inspect.Signature) -> str:
    text = "(" + ", ".join(
        ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "")
        + p.name + ("" if p.default is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                    else "=...")
        for p in sig.parameters.values()) + ")"
    return text if len(text) <= 200 else text[:197] + "..."


def resized(inputs: Inputs, symbolic_shapes: list[tuple | None], ranges: dict) -> Inputs | None:
    """Inputs whose dynamic dimensions take new values (None when nothing is dynamic).

    Args:
        inputs: the example inputs.
        symbolic_shapes: per flat leaf (in ``inputs.flat()`` order) the captured shape, whose
            entries are ints or SymInts; None for non-tensor leaves.
        ranges: ``ExportedProgram.range_constraints`` (sympy symbol → value range).
    """
    leaves, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    new_values = _new_symbol_values(leaves, symbolic_shapes, ranges)
    if not new_values:
        return None
    out = []
    for leaf, sshape in zip(leaves, symbolic_shapes):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            out.append(leaf)
            continue
        t = leaf
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                continue
            expr = s.node.expr.subs(new_values)
            if not expr.is_number:
                return None
            n = int(expr)
            if n != t.shape[d]:
                idx = torch.arange(n, device=t.device) % t.shape[d]
                t = t.index_select(d, idx)
        out.append(t.contiguous())
    args, kwargs = pytree.tree_unflatten(out, spec)
    return Inputs(args=tuple(args), kwargs=dict(kwargs))


def _new_symbol_values(leaves, symbolic_shapes, ranges) -> dict:
    """Pick a new value for every free symbol, inside its range."""
    examples: dict = {}
    for leaf, sshape in zip(leaves, symbolic_shapes):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            continue
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                continue
            expr = s.node.expr
            if expr.is_Symbol:
                examples.setdefault(expr, int(leaf.shape[d]))
            elif len(expr.free_symbols) == 1:
                sym = next(iter(expr.free_symbols))
                if sym not in examples:
                    import sympy

                    sol = sympy.solve(expr - int(leaf.shape[d]), sym)
                    if len(sol) == 1 and sol[0].is_integer:
                        examples[sym] = int(sol[0])
    new = {}
    for sym, v in examples.items():
        vr = ranges.get(sym)
        lo = _bound(vr.lower if vr is not None else None, 0)
        hi = _bound(vr.upper if vr is not None else None, 1 << 30)
        # Small sizes (batch, heads) double, which keeps ratios between them (GQA groups);
        # lengths grow by an odd amount, so they are no multiple of a block size.
        first = 2 * v if v <= 8 else v + 3
        for cand in (first, v + 1, v - 1, lo):
            if lo <= cand <= hi and cand != v:
                new[sym] = cand
                break
    return new


def _bound(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _desc(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype}".replace("torch.", "") + str(list(x.shape))
    return repr(x)
