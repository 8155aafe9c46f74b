"""OptimizedModel: the rewritten graph, called like the original model.

Calls are bound against the original ``forward``'s signature (see ``attnopt._call``); dtype and
device moves (``.half()``, ``.to(torch.bfloat16)``, ``.to(device)``) are tried on a copy of the
graph, re-verified on the example inputs, and either adopted or refused with a typed error.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from attnopt._call import CallSpec, check_tensors, guard_error, leaf_paths
from attnopt._inputs import Inputs
from attnopt.capture import Captured, reexport
from attnopt.config import Config
from attnopt.errors import ConfigError, ValidationError
from attnopt.report import Report
from attnopt.sites import AttentionSite
from attnopt.verify import compare, default_tolerance

log = logging.getLogger("attnopt")


class OptimizedModel(torch.nn.Module):
    """A model whose attention sites were rewritten; call it like the original.

    Any call the original ``forward`` accepts for the captured arguments works: positional or
    keyword, optional arguments omitted. Arguments captured as constants (``call_defaults``,
    e.g. ``use_cache=False``) cannot take another value, and sizes must stay within the captured
    dynamic ranges: both raise :class:`attnopt.CallError` naming the argument.

    Attributes:
        report: one row per site (see :class:`attnopt.report.Report`).
        config: the config it was optimized with.
    """

    def __init__(self, gm: torch.fx.GraphModule, captured: Captured, report: Report,
                 config: Config, call: CallSpec | None = None) -> None:
        super().__init__()
        self.graph_module = gm
        self.report = report
        self.config = config
        self._captured = captured
        self._call = call or CallSpec([], [], list(captured.inputs.kwargs), {},
                                      dict(captured.injected))
        self._program: ExportedProgram | None = None
        self._float_dtype: torch.dtype | None = None  # set by a dtype move
        if self._call.constants:
            consts = ", ".join(f"{k}={v!r}" for k, v in self._call.constants.items())
            note = f"arguments captured as constants (other values are refused): {consts}"
            if note not in report.notes:
                report.notes.append(note)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rewritten graph on a call of the original ``forward``'s form."""
        args, kwargs = self._call.bind(args, kwargs)
        in_spec = getattr(self.graph_module, "_in_spec", None)
        if in_spec is not None and not torch.compiler.is_compiling():
            inputs = Inputs(args, kwargs)
            placeholders = [n.meta.get("val") for n in self.graph_module.graph.nodes
                            if n.op == "placeholder"]
            flat = inputs.flat(in_spec)
            if len(flat) == len(placeholders):
                ordered = {k: kwargs[k] for k in (in_spec.child(1).context or kwargs)}
                check_tensors(flat, placeholders, leaf_paths(args, ordered, self._call.positional),
                              self._float_dtype)
        try:
            return self.graph_module(*args, **kwargs)
        except (AssertionError, RuntimeError) as e:
            err = guard_error(e)
            if err is None:
                raise
            raise err from None

    def train(self, mode: bool = True) -> OptimizedModel:
        """Set the training flag (for the caller's own logic).

        The graph was captured in eval mode, so dropout and other train-only behaviour stay
        off; gradients flow through every op either way.
        """
        self.training = mode
        return self

    @property
    def call_defaults(self) -> dict[str, Any]:
        """Keyword arguments added to every call (``use_cache=False`` for HF models)."""
        return dict(self._call.injected)

    @property
    def constants(self) -> dict[str, Any]:
        """Arguments captured as constants: calls must pass these values (or leave them out)."""
        return dict(self._call.constants)

    @property
    def sites(self) -> list[AttentionSite]:
        """The attention sites found in the original model."""
        return self.report.sites

    @property
    def example_inputs(self) -> Inputs:
        """The example inputs the model was captured with (injected kwargs included)."""
        return self._captured.inputs

    @property
    def dynamic_shapes(self) -> Any:
        """The dynamic-shape spec the model was captured with."""
        return self._captured.dynamic_shapes

    def exported_program(self) -> ExportedProgram:
        """The rewritten graph as an ExportedProgram (made once, from the graph, not the model)."""
        if self._program is None:
            self._program = reexport(self._captured, self.graph_module)
        return self._program

    # -- dtype / device moves ----------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.zeros(1, device=_device(self.graph_module)))
        old_dtype, old_device = _float_param(self.graph_module)
        if old_dtype is None or (probe.dtype, probe.device) == (old_dtype, old_device):
            return super()._apply(fn, recurse)
        moved = copy.deepcopy(self.graph_module)._apply(fn, recurse)
        self._verify_move(moved, probe.dtype, probe.device)
        self.graph_module = moved
        self._float_dtype = probe.dtype
        self._captured.inputs = _move(self._captured.inputs, probe.dtype, probe.device)
        if self._captured.alt_inputs is not None:
            self._captured.alt_inputs = _move(self._captured.alt_inputs, probe.dtype,
                                              probe.device)
        self._program = None
        return self

    def _verify_move(self, moved: torch.nn.Module, dtype: torch.dtype,
                     device: torch.device) -> None:
        """Run the moved graph on the example inputs; compare with the graph before the move."""
        inputs = self._captured.inputs
        with torch.no_grad():
            ref = inputs.call(self.graph_module)
            try:
                out = _move(inputs, dtype, device).call(moved)
            except Exception as e:  # noqa: BLE001 - any failure: the move is refused
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ConfigError(
                    f"the optimized graph cannot run in {dtype} on {device}: {type(e).__name__}: "
                    f"{first}. The capture baked the model's dtypes and devices into the graph "
                    f"(e.g. a .to(torch.float32) in its code); optimize a converted model "
                    f"instead: attnopt.optimize(model.to(...), example_inputs)") from None
        out = pytree.tree_map(lambda t: t.to("cpu") if isinstance(t, torch.Tensor) else t, out)
        err = compare(ref, out)
        # the less precise of the two dtypes bounds the difference
        old, _ = _float_param(self.graph_module)
        tol = max(default_tolerance(dtype), default_tolerance(old))
        where = f"after .to({dtype}, {device})"
        self.report.end_to_end[f"example inputs {where}"] = err
        if err.rel > tol:
            raise ValidationError(
                f"the optimized model {where} differs from it before the move by {err.rel:.2e} "
                f"(tolerance {tol:.0e}); optimize a converted model instead",
                error=err.rel, tolerance=tol, where=where)
        log.info("moved to %s on %s: error %.2e against the model before the move", dtype,
                 device, err.rel)


def _float_param(module: torch.nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def _device(module: torch.nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _move(inputs: Inputs, dtype: torch.dtype, device: torch.device) -> Inputs:
    def mv(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    return Inputs(pytree.tree_map(mv, inputs.args), pytree.tree_map(mv, inputs.kwargs))
