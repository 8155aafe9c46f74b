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
from collections.abc import Callable
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


@dataclass
class Resized:
    """Inputs of another size chosen for verification, and what the choice left out.

    Attributes:
        inputs: the resized inputs (None when no dimension could take another value).
        note: why some dynamic dimensions kept their example size (None when all changed).
    """

    inputs: Inputs | None
    note: str | None = None


def resized(inputs: Inputs, symbolic_shapes: list[tuple | None], ranges: dict) -> Inputs | None:
    """Inputs whose dynamic dimensions take new values (None when nothing is dynamic).

    Args:
        inputs: the example inputs.
        symbolic_shapes: per flat leaf (in ``inputs.flat()`` order) the captured shape, whose
            entries are ints or SymInts; None for non-tensor leaves.
        ranges: ``ExportedProgram.range_constraints`` (sympy symbol → value range).
    """
    return choose_resized(inputs, symbolic_shapes, ranges).inputs


def choose_resized(inputs: Inputs, symbolic_shapes: list[tuple | None], ranges: dict, *,
                   accept: Callable[[list[Any]], str | None] | None = None,
                   keep: dict | None = None) -> Resized:
    """Like :func:`resized`, choosing sizes that ``accept`` (the captured program's guards) takes.

    Every dynamic dimension changes when some tried sizes pass; otherwise only the batch-like
    symbols (dim 0 of an input), then one symbol at a time, and the note says which stayed.

    Args:
        inputs, symbolic_shapes, ranges: as for :func:`resized`.
        accept: called with flat leaves whose tensors are ``meta`` tensors of the candidate
            shapes; returns None to accept, or the reason the sizes are rejected.
        keep: symbols that must keep their example value, mapped to why (e.g. a fitted
            per-head state fixes the head count).
    """
    keep = keep or {}
    leaves, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    examples, where = _example_values(leaves, symbolic_shapes, _leaf_names(inputs))
    free = [s for s in examples if s not in keep]
    kept_note = _kept_note(keep, where)
    if not free:
        return Resized(None, kept_note)
    options = {s: _candidate_values(examples[s], ranges.get(s)) for s in free}
    options = {s: c for s, c in options.items() if c}
    if not options:
        return Resized(None, kept_note)
    batch_like = [s for s in options if any(d == 0 for _, d in where[s])]
    rejected: list[str] = []

    def shapes_if_accepted(values: dict) -> list | None:
        shapes = _shapes(leaves, symbolic_shapes, {**examples, **values})
        if shapes is None:
            return None
        why = accept(_meta_leaves(leaves, shapes)) if accept is not None else None
        if why is not None:
            rejected.append(why)
            return None
        return shapes

    preferred = {s: c[0] for s, c in options.items()}
    if shapes_if_accepted(preferred) is not None:
        return _build(leaves, symbolic_shapes, spec, {**examples, **preferred}, kept_note)
    # Each symbol's first accepted value when it alone changes.
    alone = {}
    for sym, cands in options.items():
        alone[sym] = next((c for c in cands if shapes_if_accepted({sym: c}) is not None), None)
    tries = [{s: c for s, c in alone.items() if c is not None}]
    tries += [{s: c[min(i, len(c) - 1)] for s, c in options.items()}
              for i in range(1, max(len(c) for c in options.values()))]
    tries += [{s: alone[s] for s in batch_like if alone[s] is not None}]
    tries += [{s: c} for s, c in alone.items() if c is not None]
    for values in tries:
        shapes = shapes_if_accepted(values) if values else None
        if shapes is None:
            continue
        stayed = [s for s in options if s not in values]
        first_rejection = rejected[0] if rejected else None
        note = "; ".join(filter(None, [kept_note, _stayed_note(stayed, where, first_rejection)]))
        return _build(leaves, symbolic_shapes, spec, {**examples, **values}, note or None)
    why = f" ({rejected[0]})" if rejected else ""
    note = (f"no other input size that was tried passes the captured program's guards{why}: "
            "verified on the example inputs only")
    return Resized(None, "; ".join(filter(None, [kept_note, note])))


def _build(leaves, symbolic_shapes, spec, values: dict, note: str | None) -> Resized:
    shapes = _shapes(leaves, symbolic_shapes, values)
    out = [_tile(leaf, shp) for leaf, shp in zip(leaves, shapes)]
    args, kwargs = pytree.tree_unflatten(out, spec)
    return Resized(Inputs(args=tuple(args), kwargs=dict(kwargs)), note)


def _leaf_names(inputs: Inputs) -> list[str]:
    """A readable name per flat leaf: the keyword, or ``input <i>`` for positional ones."""
    paths, _ = pytree.tree_flatten_with_path((inputs.args, inputs.kwargs))
    names = []
    for path, _leaf in paths:
        head, *rest = path[1:] if path else ((),)
        base = (f"input {head.idx}" if isinstance(head, pytree.SequenceKey)
                else str(getattr(head, "key", head)))
        names.append(base + (pytree.keystr(tuple(rest)) if rest else ""))
    return names


def _example_values(leaves, symbolic_shapes, names) -> tuple[dict, dict]:
    """Each free symbol's example value, and where it appears as ``[(input name, dim)]``."""
    examples: dict = {}
    where: dict = {}
    for leaf, sshape, name in zip(leaves, symbolic_shapes, names):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            continue
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                continue
            expr = s.node.expr
            if expr.is_Symbol:
                examples.setdefault(expr, int(leaf.shape[d]))
                where.setdefault(expr, []).append((name, d))
            elif len(expr.free_symbols) == 1:
                sym = next(iter(expr.free_symbols))
                if sym not in examples:
                    import sympy

                    sol = sympy.solve(expr - int(leaf.shape[d]), sym)
                    if len(sol) == 1 and sol[0].is_integer:
                        examples[sym] = int(sol[0])
                        where.setdefault(sym, []).append((name, d))
    return examples, where


def _candidate_values(v: int, vr) -> list[int]:
    """New values for a symbol whose example value is ``v``, best first, inside its range.

    Small sizes (batch, heads) double first, which keeps ratios between them (GQA groups);
    lengths first grow by an odd amount, so they are no multiple of a block size; the even and
    larger steps after them suit code that pads or windows (Swin needs even image sizes).
    """
    lo = _bound(vr.lower if vr is not None else None, 0)
    hi = _bound(vr.upper if vr is not None else None, 1 << 30)
    first = [2 * v, v + 1] if v <= 8 else [v + 3, v + 1]
    seq = [*first, v + 2, v + 4, v + 8, v + v // 2, 2 * v, v - 1, v - 2, v - 4, lo]
    out: list[int] = []
    for c in seq:
        if lo <= c <= hi and c != v and c > 0 and c not in out:
            out.append(c)
    return out


def _shapes(leaves, symbolic_shapes, values: dict) -> list[tuple | None] | None:
    """Each tensor leaf's shape under ``values`` (None for other leaves); None if undefined."""
    out: list[tuple | None] = []
    for leaf, sshape in zip(leaves, symbolic_shapes):
        if not isinstance(leaf, torch.Tensor) or sshape is None:
            out.append(None)
            continue
        dims = []
        for d, s in enumerate(sshape):
            if isinstance(s, int):
                dims.append(int(leaf.shape[d]))
                continue
            expr = s.node.expr.subs(values)
            if not expr.is_number or int(expr) <= 0:
                return None
            dims.append(int(expr))
        out.append(tuple(dims))
    return out


def _meta_leaves(leaves, shapes) -> list[Any]:
    return [torch.empty(shp, dtype=leaf.dtype, device="meta") if shp is not None else leaf
            for leaf, shp in zip(leaves, shapes)]


def _tile(leaf: Any, shp: tuple | None) -> Any:
    """``leaf`` tiled or cropped to ``shp`` (token ids stay ids, padding masks stay 0/1)."""
    if shp is None:
        return leaf
    t = leaf
    for d, n in enumerate(shp):
        if n != t.shape[d]:
            t = t.index_select(d, torch.arange(n, device=t.device) % t.shape[d])
    return t.contiguous()


def _dims_text(syms, where) -> str:
    return ", ".join(f"{name} dim {d}" for s in syms for name, d in where.get(s, [])[:1])


def _kept_note(keep: dict, where: dict) -> str | None:
    if not keep:
        return None
    parts = [f"{_dims_text([s], where)} ({why})" for s, why in keep.items() if s in where]
    return ("resized inputs keep the example size of " + "; ".join(parts)) if parts else None


def _stayed_note(stayed, where, rejected: str | None) -> str | None:
    if not stayed:
        return None
    why = f": {rejected}" if rejected else ""
    return (f"resized inputs keep the example size of {_dims_text(stayed, where)} (no other "
            f"size tried for it passes the captured program's guards{why})")


def _bound(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def _desc(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype}".replace("torch.", "") + str(list(x.shape))
    return repr(x)
