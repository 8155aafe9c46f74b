"""ONNX export: optimized model → validated ``.onnx`` file (ONNX Runtime or standard ONNX).

    rewritten ExportedProgram ──torch.onnx.export(dynamo, opset 23, attnopt translations)──▶
    ONNX model ──standard fusions (onnxscript; layer norms, GELU)──▶ checker ──▶ onnxruntime
    parity on the example inputs and on inputs of another batch size / length ──▶ file

Each attnopt op lowers through the translation registered for the target
(``attnopt.export._registry``), so every attention site becomes one attention operator. The
file is written under a temporary name and moved into place only after validation: a failed
export never leaves a half-written ``.onnx`` behind. The standard fusions are optional: when
the fused graph fails validation and the unfused one passes, the unfused file is written and
the report says so.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from attnopt._inputs import Inputs
from attnopt._quiet import quiet
from attnopt.capture import run_rewritten
from attnopt.errors import ConfigError, ExportError, ValidationError
from attnopt.export._dim_names import rename_dynamic_dims
from attnopt.export._registry import ONNX_TARGETS, OPSET, translation_table
from attnopt.verify import ErrorStats, compare, default_tolerance, model_dtype

log = logging.getLogger("attnopt.export")

ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "SparseAttention"}
_MAIN_OPS_SKIP = {"Constant", "Shape", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape",
                  "Transpose", "Cast", "CastLike", "Expand", "Gather", "Sub", "Identity"}


@dataclass
class ExportedSite:
    """How one attention site looks in the ONNX graph."""

    index: int
    location: str
    variant: str
    ops: list[str]
    attention_op: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"index": self.index, "location": self.location, "variant": self.variant,
                "ops": self.ops, "attention_op": self.attention_op}


@dataclass
class ExportReport:
    """What the export produced and how well it matches torch."""

    target: str
    opset: int
    sites: list[ExportedSite] = field(default_factory=list)
    parity: dict[str, ErrorStats] = field(default_factory=dict)
    tolerance: float = 1e-4
    file_size: int = 0
    fusions: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """Worst parity error over every validated input set."""
        return max((e.rel for e in self.parity.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "target": self.target, "opset": self.opset,
            "sites": [s.to_dict() for s in self.sites],
            "parity": {k: v.to_dict() for k, v in self.parity.items()},
            "max_error": self.max_error, "tolerance": self.tolerance,
            "file_size": self.file_size, "fusions": self.fusions, "op_counts": self.op_counts,
            "notes": self.notes, "timings_s": self.timings,
        }

    def table(self) -> str:
        """A text rendering."""
        lines = [f"ONNX export (target {self.target}, opset {self.opset}): "
                 f"{self.file_size / 1e6:.1f} MB"]
        for s in self.sites:
            op = s.attention_op or "decomposed: " + ",".join(s.ops[:6])
            if s.variant == UNTOUCHED:
                op = "original ops, no attention op"
            lines.append(f"  site {s.index} {s.location}: {s.variant} -> {op}")
        if self.fusions:
            lines.append("  standard fusions: " + ", ".join(
                f"{k}={v}" for k, v in self.fusions.items() if v))
        for name, err in self.parity.items():
            lines.append(f"  onnxruntime vs torch on {name}: {err.rel:.2e} "
                         f"(tolerance {self.tolerance:.0e})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class ExportResult:
    """A validated ONNX file and its report."""

    path: Path
    target: str
    input_names: list[str]
    output_names: list[str]
    report: ExportReport

    def session(self, providers: list[Any] | None = None, threads: int | None = None,
                **options: Any):
        """An ``onnxruntime.InferenceSession`` on the file.

        Providers default to CUDA (with ``onnxruntime-gpu``) then CPU; pass e.g.
        ``["tensorrt", "cuda", "cpu"]`` or ``[("CUDAExecutionProvider", {"device_id": 1})]``
        (see :mod:`attnopt.export.runtime` for provider options). ``threads``: intra-op threads;
        ``options``: other ``SessionOptions`` attributes.
        """
        from attnopt.export import runtime

        return runtime.session(str(self.path), providers, threads, **options)

    def bind(self, session: Any, inputs: Any, device: str = "cuda", device_id: int = 0):
        """An ``IOBinding`` of ``inputs`` on ``device`` for ``session.run_with_iobinding``."""
        from attnopt.export import runtime

        return runtime.bind(session, self.feed(inputs), device, device_id)

    def feed(self, inputs: Any) -> dict[str, Any]:
        """Map model inputs (tuple / dict, as given to the model) to a session feed."""
        from attnopt._inputs import normalize

        return _feed(self.input_names, normalize(inputs))


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    target: str = "onnxruntime",
    dynamic: bool = True,
    fuse: bool = True,
    validate: bool = True,
    tolerance: float | None = None,
    config: Any = None,
    tensorrt_version: str | None = None,
    precision: str | None = None,
) -> ExportResult:
    """Export an optimized model (or optimize a plain one first) to a validated ONNX file.

    Args:
        model: an :class:`attnopt.OptimizedModel`, or any module (optimized with ``config``).
        example_inputs: the inputs it was optimized with (tuple or dict).
        path: the ``.onnx`` file to write (its directory must exist and be writable).
        target: ``"onnxruntime"`` (contrib attention ops, flash-style on CPU), ``"onnx"``
            (standard ONNX ``Attention``, opset 23) or ``"tensorrt"`` (standard ONNX that
            TensorRT's parser accepts, checked against its operator matrix; see
            :mod:`attnopt.tensorrt`).
        dynamic: keep batch / sequence axes dynamic (as captured); False exports static shapes.
        fuse: apply the standard non-attention fusions (layer norm, GELU) for the target.
        validate: run ``onnx.checker`` and onnxruntime parity checks (strongly recommended).
        tolerance: max parity error (relative to the output's scale); default by the model's
            dtype, as for ``optimize`` (1e-4 fp32, 1e-2 fp16, 3e-2 bf16).
        config: an :class:`attnopt.Config` used when ``model`` is not optimized yet.
        tensorrt_version: target ``"tensorrt"`` only: the TensorRT release the file is for
            (default ``"11.4"``); >= 10.14 writes one ``Attention`` node per site, older
            releases the decomposed pattern TensorRT fuses.
        precision: target ``"tensorrt"`` only: ``"fp32"``, ``"fp16"`` or ``"bf16"``: a plain
            model is converted (a copy) and the graph carries that precision, as strongly
            typed TensorRT builds need; default: the model's dtype.

    Returns:
        An :class:`ExportResult`; ``result.session()`` opens it in onnxruntime.

    Raises:
        ConfigError: unknown target, unwritable path.
        ExportError: the exporter failed (the message names the failing op).
        ValidationError: parity with torch broke (the message names the site when it can).
    """
    from attnopt.api import OptimizedModel, optimize

    if target not in ONNX_TARGETS:
        raise ConfigError(f"unknown export target {target!r}; choose one of {ONNX_TARGETS}")
    path = Path(path)
    _check_writable(path)
    trt = _tensorrt_target(target, tensorrt_version, precision)
    if trt is not None:
        model, example_inputs = trt.prepare(model, example_inputs)
        validate_ort = validate and trt.runs_in_onnxruntime
    else:
        validate_ort = validate
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fast = model if isinstance(model, OptimizedModel) else optimize(model, example_inputs, config)
    timings["optimize"] = round(time.perf_counter() - t0, 3)
    tolerance = tolerance or default_tolerance(model_dtype(fast.graph_module))
    report = ExportReport(target=target, opset=OPSET, tolerance=tolerance,
                          timings=timings)
    if not fast.report.rows:
        report.notes.append("the model has no attention: exported as is")
    t0 = time.perf_counter()
    program = fast.exported_program() if dynamic else _static_program(fast)
    timings["capture"] = round(time.perf_counter() - t0, 3)

    tmp = _temp_beside(path)
    unfused = _temp_beside(path) if fuse and validate_ort else None
    try:
        t0 = time.perf_counter()
        onnx_model, input_names, output_names = _convert(
            program, fast, target, trt.translation_table() if trt is not None else None)
        timings["export"] = round(time.perf_counter() - t0, 3)
        if validate_ort:
            _check(onnx_model, unfused or tmp)
        if fuse:
            t0 = time.perf_counter()
            untouched = [r.site for r in fast.report.rows
                         if r.outcome not in ("fused", "rewritten")]
            onnx_model, report.fusions = _standard_fusions(onnx_model, target,
                                                           attention=not untouched)
            if untouched and target == "onnxruntime":
                report.notes.append(
                    "attention fusions of the standard ORT rewriter skipped: site(s) "
                    + ", ".join(f"{s.index} ({s.location})" for s in untouched)
                    + " stay as the original code, which those fusions would turn into "
                    "MultiHeadAttention")
            timings["fuse"] = round(time.perf_counter() - t0, 3)
        if fuse or not validate_ort:  # otherwise the checked file at ``tmp`` is this model
            _save(onnx_model, tmp)
        del onnx_model
        report.notes.append(_axes_note(tmp))
        t0 = time.perf_counter()
        try:
            _describe_and_validate(tmp, fast, input_names, report, dynamic, validate_ort, trt)
        except (ExportError, ValidationError) as e:
            if unfused is None:
                raise
            # The fusions are an optional optimization from a third-party rewriter: a graph
            # they break is exported without them (and says so), never with a wrong result.
            # If the unfused graph fails too, its error (the real cause) is raised.
            fusions = ", ".join(report.fusions)
            report.fusions, report.parity = {}, {}
            os.replace(unfused, tmp)
            _describe_and_validate(tmp, fast, input_names, report, dynamic, validate_ort, trt)
            log.warning("the standard fusions broke the exported graph (%s); exported without "
                        "them", e)
            report.notes.append(f"standard fusions dropped ({fusions}): the fused graph failed "
                                f"validation: {str(e)[:300]}")
        if validate:
            timings["validate"] = round(time.perf_counter() - t0, 3)
        if trt is not None:
            trt.finalize(tmp)
        os.replace(tmp, path)
    finally:
        for f in (tmp, unfused):
            if f is not None and f.exists():
                f.unlink()
    report.file_size = path.stat().st_size
    if trt is not None:
        trt.write_commands(path)
        report.notes += trt.notes
        report.opset = trt.opset or report.opset
    log.info("exported %s (%s, %.1f MB)", path, target, report.file_size / 1e6)
    return ExportResult(path, target, input_names, output_names, report)


# -- steps -----------------------------------------------------------------------------------------


def _temp_beside(path: Path) -> Path:
    """An empty temporary file next to ``path`` (same filesystem: ``os.replace`` is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes it private; the export is a normal file
    return Path(name)


def _describe_and_validate(path: Path, fast, input_names: list[str], report: ExportReport,
                           dynamic: bool, validate: bool, trt=None) -> None:
    """Fill the report's per-site ops and op counts from the file, then validate it."""
    if trt is not None:
        trt.rewrite(path, fast, input_names, dynamic, validate)
    if validate and report.target == "onnx":
        _check_file(path)
    report.sites = _sites_in_graph(path, fast)
    report.op_counts = dict(Counter(n.op_type for n in _load_nodes(path)))
    if validate:
        _validate(path, fast, input_names, report, dynamic)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; pass a file path such as {path / 'model.onnx'}")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: directory {parent} is not writable")


def _static_program(fast) -> torch.export.ExportedProgram:
    inputs = fast.example_inputs
    with quiet():
        return torch.export.export(fast.graph_module, inputs.args, inputs.kwargs, strict=False)


def _tensorrt_target(target: str, version: str | None, precision: str | None):
    """The tensorrt target's steps (``attnopt.tensorrt._export``), or None for other targets."""
    if target != "tensorrt":
        if version is not None or precision is not None:
            raise ConfigError("tensorrt_version / precision apply to target='tensorrt' only; "
                              f"got target={target!r}")
        return None
    from attnopt.tensorrt._export import TensorRTTarget
    from attnopt.tensorrt._matrix import DEFAULT_VERSION

    return TensorRTTarget(version or DEFAULT_VERSION, precision)


def _convert(program, fast, target: str, table: dict | None = None):
    output_names = _output_names(fast)
    try:
        with quiet():
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
                custom_translation_table=table if table is not None else translation_table(target),
                output_names=output_names,
            )
    except Exception as e:  # noqa: BLE001 - re-raised with a readable summary
        raise ExportError(f"torch.onnx.export failed for target {target!r}: "
                          f"{_summarize_exporter_error(e)}") from e
    model = onnx_program.model
    _fix_static_dims(model)
    rename_dynamic_dims(model)
    input_names = [v.name for v in model.graph.inputs]
    return model, input_names, [v.name for v in model.graph.outputs]


def _fix_static_dims(model) -> None:
    """Write static input/output dims as numbers: the exporter can leave them as names ("3")."""
    import onnx_ir as ir

    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.shape is None:
            continue
        dims = [int(d.value) if isinstance(d, ir.SymbolicDim) and d.value and d.value.isdigit()
                else d for d in v.shape]
        v.shape = ir.Shape(dims)


def _output_names(fast) -> list[str] | None:
    """HF-style output names (``last_hidden_state``, ``logits``...) from the output structure."""
    with torch.no_grad():
        out = fast.example_inputs.call(fast.graph_module)
    leaves = pytree.tree_flatten_with_path(out)[0]
    names = []
    for keypath, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = "_".join(re.sub(r"[^A-Za-z0-9_]", "", str(k)) or "out" for k in keypath)
        names.append(name or "output")
    if len(set(names)) != len(names):
        return None
    return names or None


def _standard_fusions(model, target: str, *, attention: bool = True):
    """Non-attention fusions by maintained rewriters (onnxscript), per target.

    ``attention=False`` leaves out the rewriter's attention fusions (SDPA, MHA, GQA): sites the
    user left untouched must not become attention ops behind their back.
    """
    import onnxscript.optimizer

    counts: dict[str, int] = {}
    with quiet():
        onnxscript.optimizer.optimize(model)  # constant folding, dead code
        if target == "onnxruntime":
            if attention:
                from onnxscript.rewriter import ort_fusions

                model, counts = ort_fusions.optimize_for_ort(model)
            else:
                counts = _ort_fusions_without_attention(model)
            counts = {k: int(v) for k, v in counts.items() if v}
    return model, counts


def _ort_fusions_without_attention(model) -> dict[str, int]:
    """Onnxscript's ``fuse_xformers`` minus its attention fusions (normalisations and GELU)."""
    from onnxscript.rewriter.ort_fusions import _core

    _core._pre_optimize(model)
    counts = {
        "erf_gelu": _core.fuse_erfgelu(model),
        "rms_normalization": _core.fuse_rms_normalization(model),
        "skip_layer_normalization": _core.fuse_skip_layer_normalization(model),
        "skip_rms_normalization": _core.fuse_skip_rms_normalization(model),
        "gelu": _core.fuse_gelu(model),
        "bias_gelu": _core.fuse_bias_gelu(model),
    }
    _core.optimize(model)
    return counts


def _save(model, path: Path) -> None:
    import onnx_ir as ir

    ir.save(model, str(path))


def _load_nodes(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


def _axes_note(path: Path) -> str:
    """Which input axes are dynamic in the file (axes the model cannot vary are static)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dyn, static = [], []
    for v in graph.input:
        dims = v.type.tensor_type.shape.dim
        d = [i for i, x in enumerate(dims) if x.dim_param]
        st = [f"{i}={x.dim_value}" for i, x in enumerate(dims) if not x.dim_param]
        if d:
            dyn.append(f"{v.name}{d}")
        if st:
            static.append(f"{v.name}[{', '.join(st)}]")
    return ("dynamic axes: " + (", ".join(dyn) or "none")
            + ("; fixed by the model: " + ", ".join(static) if static else ""))


def _sites_in_graph(path: Path, fast) -> list[ExportedSite]:
    """Group the ONNX nodes by the attnopt op node (fx name) they were translated from.

    Every site gets a row: rewritten sites with the ONNX ops of their attnopt op, sites left as
    the original code (override ``None``, reverted) with no attention op.
    """
    by_fx: dict[str, list[str]] = {}
    for n in _load_nodes(path):
        fx = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        m = re.match(r"%(\S+) : .*target=torch\.ops\.attnopt\.", fx)
        if m:
            by_fx.setdefault(m.group(1), []).append(n.op_type)
    fx_of_site = {index: name for name, index in _op_sites(fast, fast.exported_program()).items()}
    out = []
    for row in fast.report.rows:
        if row.outcome not in ("fused", "rewritten"):
            out.append(ExportedSite(row.site.index, row.site.location, UNTOUCHED, [], None))
            continue
        ops = by_fx.get(fx_of_site.get(row.site.index, ""), [])
        attn = next((o for o in ops if o in ATTENTION_OPS), None)
        main = [o for o in dict.fromkeys(ops) if o not in _MAIN_OPS_SKIP]
        out.append(ExportedSite(row.site.index, row.site.location, row.variant or "", main, attn))
    return out


UNTOUCHED = "untouched (original code)"


def _op_sites(fast, program) -> dict[str, int]:
    """Fx name of each attnopt op node in ``program`` → the index of the site it computes.

    The rewrite pass stamps each op node of the optimized graph module with its site
    (``meta["attnopt_site"]``); re-exporting that module traces the same code, so its attnopt
    ops come out in the same order, which the op targets confirm pair by pair.
    """
    def ops(graph):
        return [n for n in graph.nodes
                if n.op == "call_function" and str(n.target).startswith("attnopt.")]

    source, exported = ops(fast.graph_module.graph), ops(program.graph)
    if len(source) != len(exported) or any(a.target != b.target
                                            for a, b in zip(source, exported)):
        log.debug("attnopt ops of the exported program do not match the optimized graph's")
        return {}
    return {b.name: a.meta["attnopt_site"] for a, b in zip(source, exported)
            if "attnopt_site" in a.meta}


def _validate(path: Path, fast, input_names: list[str], report: ExportReport,
              dynamic: bool) -> None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        hint = ""
        if "NOT_IMPLEMENTED" in str(e):
            hint = (" (ONNX Runtime's CPU provider has no kernel for this op with these types, "
                    "as for most bfloat16 ops: export a float32 or float16 copy of the model, "
                    "or pass validate=False to skip the onnxruntime check)")
        raise ExportError(f"onnxruntime cannot load the exported model: {e}{hint}") from e
    sets = fast._captured.input_sets() if dynamic else [fast.example_inputs]
    names = ["example inputs", "resized inputs"]
    for name, inputs in zip(names, sets):
        run = run_rewritten(fast._captured, inputs, fast.graph_module)
        if run.failure is not None:
            if name == names[0]:
                raise ExportError(f"the optimized graph fails on the example inputs: "
                                  f"{run.failure}")
            report.notes.append(f"not validated on {name} {inputs.describe()}: {run.failure}")
            continue
        ref = run.output
        ref_leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
        try:
            outs = sess.run(None, _feed(input_names, inputs))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime failed running the exported model on {name} "
                              f"({inputs.describe()}): {str(e).splitlines()[0][:400]}") from e
        err = compare(ref_leaves, [torch.from_numpy(o) for o in outs])
        report.parity[f"{name} {inputs.describe()}"] = err
        if err.rel > report.tolerance:
            where = _diagnose(path, fast, inputs, input_names, report.tolerance)
            raise ValidationError(
                f"onnxruntime output differs from torch on {name}: error {err.rel:.2e} > "
                f"tolerance {report.tolerance:.0e}{where}", error=err.rel,
                tolerance=report.tolerance, where=name)


def _check(model, tmp: Path) -> None:
    """``onnx.checker`` (full check, shape inference included) on the exported graph.

    For the onnxruntime target this runs before the standard fusions: they introduce ORT ops
    (e.g. ``SimplifiedLayerNormalization``) that ORT registers in the ONNX domain and the onnx
    checker does not know; the fused file is validated by loading and running it in ORT.
    """
    _save(model, tmp)
    _check_file(tmp)


def _check_file(path: Path) -> None:
    import onnx

    from attnopt.export._registry import msft

    msft()  # registers the schemas of the contrib attention ops attnopt emits
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from e


def _feed(input_names: list[str], inputs: Inputs) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for k, v in inputs.kwargs.items():
        if isinstance(v, torch.Tensor):
            named[k] = v
    leaves = [x for x in pytree.tree_leaves(inputs.args) if isinstance(x, torch.Tensor)]
    if all(n in named for n in input_names):
        chosen = [named[n] for n in input_names]
    else:
        pool = leaves + list(named.values())
        if len(pool) < len(input_names):
            raise ExportError(f"the ONNX model takes inputs {input_names}; got "
                              f"{inputs.describe()}")
        chosen = pool[: len(input_names)]
    return {n: t.detach().cpu().numpy() for n, t in zip(input_names, chosen)}


def _diagnose(path: Path, fast, inputs: Inputs, input_names: list[str], tol: float) -> str:
    """Name the first attention site whose ONNX output differs from torch (best effort)."""
    try:
        import onnx
        import onnxruntime as ort

        from attnopt.verify import record

        program = fast.exported_program()
        gm = program.module()
        targets = {n.name: n for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("attnopt.")}
        flat = inputs.flat(program.call_spec.in_spec)
        values = record(gm, flat, set(targets.values()))
        model = onnx.load(str(path))
        have = {o for n in model.graph.node for o in n.output}
        names = [n for n in targets if n in have]
        for n in names:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(names, _feed(input_names, inputs))
        site_of = _op_sites(fast, program)
        sites = {r.site.index: r.site for r in fast.report.rows}
        for n, o in zip(names, outs):
            err = compare(values[targets[n]], torch.from_numpy(o)).rel
            if err > tol:
                site = sites.get(site_of.get(n, -1))
                label = f"site {site.index} ({site.location})" if site else n
                return f"; first differing attention: {label}, error {err:.2e}"
        return "; every attention op matches: the difference comes from other ops"
    except Exception as e:  # noqa: BLE001 - diagnosis must not hide the real error
        log.debug("parity diagnosis failed: %s", e)
        return ""


def _summarize_exporter_error(e: Exception) -> str:
    text = str(e)
    lines = [ln for ln in text.splitlines() if ln.startswith("<class") or "Error" in ln]
    return (lines[0] if lines else text.splitlines()[0] if text else type(e).__name__)[:500]
