"""Capture: model + example inputs → ATen-level FX graph via ``torch.export`` (non-strict).

Every tensor dimension is marked ``Dim.AUTO``: torch.export keeps dynamic what the model allows
(batch, sequence) and specialises the rest (image size, feature bins) without failing. When that
fails, a static capture is tried (the report says so). When both fail, ``CaptureError`` names the
failing construct and what to try.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from attnopt._inputs import Inputs, Resized, check_signature, choose_resized, input_error
from attnopt._quiet import quiet
from attnopt.errors import CaptureError, ConfigError

log = logging.getLogger("attnopt.capture")


@dataclass
class Captured:
    """A captured model.

    Attributes:
        program: the ExportedProgram torch.export produced.
        gm: its unlifted GraphModule (parameters as attributes; placeholders = flat user inputs);
            this is the IR the passes rewrite.
        inputs: the example inputs (with injected keyword arguments, see ``injected``).
        alt_inputs: inputs of another batch size / sequence length (None when all is static).
        dynamic: True when some input dimension stayed dynamic.
        dynamic_shapes: the spec passed to torch.export (reused to re-export the rewritten graph).
        injected: keyword arguments attnopt added (``use_cache=False`` for HF models).
        notes: remarks for the report (static fallback, eval mode, ...).
    """

    program: ExportedProgram
    gm: torch.fx.GraphModule
    inputs: Inputs
    alt_inputs: Inputs | None
    dynamic: bool
    dynamic_shapes: object
    injected: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resize_note: str | None = None
    _kept: dict = field(default_factory=dict, repr=False)
    _shapes: list = field(default_factory=list, repr=False)

    def input_sets(self) -> list[Inputs]:
        """The example inputs, then the alternate-size inputs when there are any."""
        return [self.inputs] + ([self.alt_inputs] if self.alt_inputs is not None else [])

    def flat(self, inputs: Inputs) -> list:
        """Flat leaves of ``inputs`` in the graph's placeholder order."""
        return inputs.flat(self.program.call_spec.in_spec)

    def keep_static(self, symbols: dict) -> None:
        """Choose the alternate-size inputs again, keeping ``symbols`` (sympy symbol → why) at
        their example values: a rewrite whose state fixes a size (per-head parameters fix the
        head count) is verified on inputs it can take.
        """
        new = {s: why for s, why in symbols.items() if s not in self._kept}
        if not new:
            return
        self._kept.update(new)
        chosen = _resize(self.program, self.gm, self.inputs, self._kept)
        self.alt_inputs, self.resize_note = chosen.inputs, chosen.note

    def drop_alt_inputs(self, why: str) -> None:
        """Forget the alternate-size inputs (later checks, e.g. ONNX parity, skip them)."""
        self.alt_inputs = None
        self.resize_note = why


def capture(model: torch.nn.Module, inputs: Inputs, *, dynamic: bool = True) -> Captured:
    """Export ``model`` on ``inputs``; see the module docstring."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_signature(model, inputs)
    inputs, injected = _with_hf_defaults(model, inputs)
    notes: list[str] = []
    if injected:
        notes.append("captured with " + ", ".join(f"{k}={v!r}" for k, v in injected.items()))
    spec = _auto_dynamic_shapes(model, inputs) if dynamic else None
    with eval_mode(model, notes):
        try:
            program = _export(model, inputs, spec)
        except Exception as dyn_err:  # noqa: BLE001 - any export failure: retry statically
            if spec is None:
                raise input_error(dyn_err, model, inputs) or _capture_error(dyn_err) from dyn_err
            log.info("dynamic capture failed (%s); retrying with static shapes",
                     str(dyn_err).splitlines()[0][:200])
            try:
                program = _export(model, inputs, None)
            except Exception as err:  # noqa: BLE001
                raise input_error(err, model, inputs) or _capture_error(err) from err
            spec = None
            notes.append("static shapes only: dynamic capture failed with "
                         + str(dyn_err).splitlines()[0][:160])
    gm = program.module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
              for n in placeholders]
    flat_example = inputs.flat(program.call_spec.in_spec)
    if len(flat_example) != len(shapes):
        raise CaptureError(
            f"the captured graph has {len(shapes)} inputs but the example has "
            f"{len(flat_example)} leaves", construct="input structure",
        )
    # resized() works on pytree order of (args, kwargs); reorder kwargs like the graph first.
    ordered = Inputs(inputs.args, _ordered_kwargs(inputs.kwargs, program))
    chosen = _resize(program, gm, ordered)
    is_dynamic = any(s is not None and any(not isinstance(d, int) for d in s) for s in shapes)
    if spec is not None and not is_dynamic:
        notes.append("every input dimension was specialised: the graph is valid for the example "
                     "shapes only")
    if is_dynamic and _has_batch_one(inputs):
        notes.append("batch size 1 in the example: torch.export specialises size-1 dims; "
                     "pass batch >= 2 for a dynamic batch")
    log.info("captured %s: %d graph nodes, %s", type(model).__name__, len(gm.graph.nodes),
             "dynamic" if is_dynamic else "static")
    return Captured(program, gm, ordered, chosen.inputs, is_dynamic, spec, injected, notes,
                    chosen.note, _shapes=shapes)


@dataclass
class GraphRun:
    """The outcome of calling the rewritten graph on some inputs.

    Attributes:
        output: what it returned (None on failure).
        failure: why it failed (None when it ran).
        rewrite_at_fault: the original captured graph runs on the same inputs, so the rewrite
            broke it; False when the captured graph itself rejects them (its guards).
    """

    output: object = None
    failure: str | None = None
    rewrite_at_fault: bool = False


def run_rewritten(captured: Captured, inputs: Inputs,
                  gm: torch.fx.GraphModule | None = None) -> GraphRun:
    """Call the rewritten graph (``gm``, default ``captured.gm``) on ``inputs`` without grad; a
    failure is a result, never an exception.

    torch.export's guards raise a bare ``AssertionError("Guard failed: ...")``; a fitted state
    of the wrong size raises a RuntimeError. Either becomes ``failure``, and the original
    captured graph tells whose fault it is.
    """
    with torch.no_grad():
        try:
            return GraphRun(output=inputs.call(captured.gm if gm is None else gm))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            err = _first_line(e)
        try:
            captured.program.module()(*inputs.args, **inputs.kwargs)
        except Exception as e:  # noqa: BLE001
            return GraphRun(failure=f"the captured graph rejects these sizes ({_first_line(e)})")
    return GraphRun(failure=f"the rewritten graph fails ({err})", rewrite_at_fault=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _resize(program: ExportedProgram, gm: torch.fx.GraphModule, inputs: Inputs,
            keep: dict | None = None) -> Resized:
    """Inputs of another batch size / length that the captured program's guards accept.

    torch.export records what its trace assumed about dynamic sizes (Swin: image sides even)
    as guards, checked by the unlifted module's ``_guards_fn`` on every call; candidate sizes
    are checked there on ``meta`` tensors before any real input is built.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
              for n in placeholders]
    guards = getattr(gm, "_guards_fn", None)

    def accept(flat: list) -> str | None:
        if guards is None:
            return None
        try:
            guards(*flat)
        except Exception as e:  # noqa: BLE001 - AssertionError("Guard failed: ...") and kin
            return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return None

    return choose_resized(inputs, shapes, program.range_constraints, accept=accept, keep=keep)


def _export(model, inputs: Inputs, spec) -> ExportedProgram:
    with quiet(stderr=True):  # a failed capture dumps graphs; the CaptureError says what failed
        return torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=spec,
                                   strict=False)


def reexport(captured: Captured, gm: torch.fx.GraphModule) -> ExportedProgram:
    """Export a rewritten graph module again (same inputs and dynamic spec).

    Dims kept static for a rewrite's state (see :meth:`Captured.keep_static`) are exported
    static: the rewritten graph is only valid at their example sizes.
    """
    inputs = captured.inputs
    spec = captured.dynamic_shapes
    if spec is not None and captured._kept:
        static = {i: {d for d, s in enumerate(shp) if not isinstance(s, int)
                      and s.node.expr.free_symbols & set(captured._kept)}
                  for i, shp in enumerate(captured._shapes) if shp is not None}
        names = list(spec)[:len(inputs.args)] if isinstance(spec, dict) and inputs.args else None
        spec = _dynamic_shapes_spec(inputs, names, static)
    with quiet():
        return torch.export.export(gm, inputs.args, inputs.kwargs, dynamic_shapes=spec,
                                   strict=False)


@contextmanager
def eval_mode(model: torch.nn.Module, notes: list[str] | None = None):
    """Run a block with ``model`` in eval mode, restoring its mode afterwards."""
    was_training = model.training
    if was_training:
        log.warning("model is in training mode; capturing it in eval mode (dropout off)")
        if notes is not None:
            notes.append("model was in training mode: captured in eval mode")
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _with_hf_defaults(model: torch.nn.Module, inputs: Inputs) -> tuple[Inputs, dict]:
    """Add ``use_cache=False`` for models whose forward takes it (a KV cache is not a tensor)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs, {}
    injected = {}
    if "use_cache" in params and "use_cache" not in inputs.kwargs and hasattr(model, "config"):
        injected["use_cache"] = False
    if not injected:
        return inputs, {}
    return Inputs(inputs.args, {**inputs.kwargs, **injected}), injected


def _auto_dynamic_shapes(model: torch.nn.Module, inputs: Inputs):
    """Dim.AUTO for every dimension of every tensor input, in torch.export's spec structure."""
    names = None
    if inputs.args and inputs.kwargs:
        # Mixed: torch.export wants a dict keyed by parameter names.
        names = [n for n, p in inspect.signature(model.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(names) < len(inputs.args):
            raise ConfigError("pass the example inputs either all positionally or all by "
                              "keyword")
    return _dynamic_shapes_spec(inputs, names, {})


def _dynamic_shapes_spec(inputs: Inputs, names: list[str] | None, static: dict[int, set]):
    """Dim.AUTO for every tensor dim except ``static[leaf index]`` (Dim.STATIC).

    Leaves are numbered in the flat order of ``(inputs.args, inputs.kwargs)``; ``names`` are the
    positional parameter names when args and kwargs are mixed.
    """
    counter = iter(range(1 << 30))

    def spec(x):
        i = next(counter)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {d: Dim.STATIC if d in static.get(i, ()) else Dim.AUTO
                    for d in range(x.dim())}
        return None

    args = tuple(pytree.tree_map(spec, a) for a in inputs.args)
    kwargs = {k: pytree.tree_map(spec, v) for k, v in inputs.kwargs.items()}
    if not inputs.kwargs:
        return args
    if not inputs.args:
        return kwargs
    return {**dict(zip(names or [], args)), **kwargs}


def _ordered_kwargs(kwargs: dict, program: ExportedProgram) -> dict:
    in_spec = program.call_spec.in_spec
    if in_spec is not None and in_spec.num_children == 2:
        order = in_spec.child(1).context
        if order is not None and set(order) == set(kwargs):
            return {k: kwargs[k] for k in order}
    return dict(kwargs)


def _has_batch_one(inputs: Inputs) -> bool:
    leaves = [x for x in pytree.tree_leaves((inputs.args, inputs.kwargs))
              if isinstance(x, torch.Tensor) and x.dim() > 0]
    return bool(leaves) and all(x.shape[0] == 1 for x in leaves)


_DIAGNOSES = [
    ("not a known type", "unsupported output type",
     "the model returns an object torch.export cannot flatten (a KV cache?); pass "
     "use_cache=False or return tensors only"),
    ("data-dependent", "data-dependent control flow",
     "a Python branch or size depends on tensor *values*; make it depend on shapes, or use "
     "torch.cond"),
    ("GuardOnDataDependent", "data-dependent control flow",
     "a Python branch or size depends on tensor *values*; make it depend on shapes, or use "
     "torch.cond"),
    ("Constraints violated", "dynamic dimension",
     "a dimension cannot be dynamic; capture with dynamic=False or fix the example shapes"),
    ("item()", "tensor.item() in forward", "avoid converting tensors to Python numbers"),
    ("Tensor.tolist", "tensor.tolist() in forward", "avoid converting tensors to Python lists"),
]


def _capture_error(err: Exception) -> CaptureError:
    text = f"{type(err).__name__}: {err}"
    construct, hint = "an unsupported construct", "simplify the failing line, or report it"
    for needle, name, h in _DIAGNOSES:
        if needle in text:
            construct, hint = name, h
            break
    where = _user_frame(err)
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    msg = (f"torch.export could not capture the model: {construct}"
           f"{f' at {where}' if where else ''}.\n  cause: {type(err).__name__}: {first}\n"
           f"  try: {hint}")
    return CaptureError(msg, construct=construct, hint=hint)


def _user_frame(err: Exception) -> str:
    """The innermost traceback frame outside torch / attnopt, as ``file:line``."""
    frames = traceback.extract_tb(err.__traceback__)
    for f in reversed(frames):
        name = f.filename.replace("\\", "/")
        if "/torch/" in name or "/attnopt/" in name or name.startswith("<"):
            continue
        return f"{name}:{f.lineno} ({f.name})"
    return ""
