"""The public pipeline, in order: capture → find → plan → check → rewrite → verify."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch.export import ExportedProgram

from attnopt._inputs import Inputs, normalize
from attnopt._match.evaluate import Evaluator
from attnopt._match.matcher import Matcher
from attnopt.capture import Captured, capture, eval_mode, reexport
from attnopt.config import Config, check_overrides
from attnopt.errors import ConfigError
from attnopt.passes.rewrite_sites import rewrite_sites, site_check_module, site_operands_module
from attnopt.report import FUSED, LEFT_EXACT, REVERTED, REWRITTEN, Report, SiteResult
from attnopt.sites import AttentionSite, Rejected
from attnopt.variants import Fused, Variant, implementation
from attnopt.variants._base import wants_fit
from attnopt.verify import compare, default_tolerance, model_dtype, record

log = logging.getLogger("attnopt")


class OptimizedModel(torch.nn.Module):
    """A model whose attention sites were rewritten; call it like the original.

    Attributes:
        report: one row per site (see :class:`attnopt.report.Report`).
        config: the config it was optimized with.
    """

    def __init__(self, gm: torch.fx.GraphModule, captured: Captured, report: Report,
                 config: Config) -> None:
        super().__init__()
        self.graph_module = gm
        self.report = report
        self.config = config
        self._captured = captured
        self._program: ExportedProgram | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rewritten graph (keyword arguments attnopt injected at capture are re-added)."""
        kwargs = {**self._captured.injected, **kwargs}
        return self.graph_module(*args, **kwargs)

    @property
    def call_defaults(self) -> dict[str, Any]:
        """Keyword arguments added to every call (``use_cache=False`` for HF models)."""
        return dict(self._captured.injected)

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


def find_attention(model: torch.nn.Module, example_inputs: Any, *,
                   dynamic: bool = True) -> list[AttentionSite]:
    """Find every attention in ``model`` (read-only).

    Args:
        model: any ``torch.nn.Module``.
        example_inputs: a tuple of positional args, a dict of keyword args, or a tensor.
        dynamic: keep batch / sequence dimensions dynamic when capturing.

    Returns:
        The sites in graph order; sites that cannot be rewritten have ``fusable=False`` and a
        ``reason``.
    """
    inputs = normalize(example_inputs)
    captured = capture(model, inputs, dynamic=dynamic)
    sites, _ = _find(captured)
    return sites


def optimize(model: torch.nn.Module, example_inputs: Any, config: Config | None = None,
             ) -> OptimizedModel:
    """Rewrite every attention of ``model`` as ``config`` says (exact fusion by default).

    Every rewrite is checked: each site in isolation on values captured from the original
    graph, then the whole model on the example inputs and on inputs of another batch size and
    sequence length. An exact rewrite that exceeds the tolerance is reverted and reported.

    Args:
        model: any ``torch.nn.Module`` (put in eval mode for the capture).
        example_inputs: a tuple of positional args, a dict of keyword args, or a tensor.
        config: what to apply; ``Config()`` (exact fusion everywhere) when None.

    Returns:
        An :class:`OptimizedModel` with a ``report``.

    Raises:
        ConfigError: bad arguments.
        CaptureError: the model cannot be captured by torch.export.
    """
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise ConfigError(f"config must be an attnopt.Config, got {type(config).__name__}")
    inputs = normalize(example_inputs)
    timings: dict[str, float] = {}
    with _timed(timings, "capture"):
        captured = capture(model, inputs, dynamic=config.dynamic)
    with _timed(timings, "find"):
        sites, rejected = _find(captured)
    check_overrides(config, [s.location for s in sites])
    tol = config.tolerance or default_tolerance(model_dtype(model))
    report = Report(model=type(model).__name__, rejected=list(rejected), tolerance=tol,
                    notes=list(captured.notes), timings=timings)
    with _timed(timings, "plan+check"):
        plan = _plan_and_check(captured, sites, config, tol, report)
    with _timed(timings, "rewrite"):
        rewrite_sites(captured.gm, plan)
    if config.verify and plan:
        with _timed(timings, "verify"):
            _verify_end_to_end(model, captured, report, tol)
    log.info("optimized %s: %d sites, %d fused, %d rewritten, %d left exact, %d reverted",
             report.model, len(report.rows), report.count(FUSED), report.count(REWRITTEN),
             report.count(LEFT_EXACT), report.count(REVERTED))
    return OptimizedModel(captured.gm, captured, report, config)


# -- stages ------------------------------------------------------------------------------------


def _find(captured: Captured) -> tuple[list[AttentionSite], list[Rejected]]:
    captured.gm.graph.eliminate_dead_code()
    evaluator = Evaluator(captured.gm, [captured.flat(i) for i in captured.input_sets()])
    return Matcher(captured.gm, evaluator).find()


def _plan_and_check(captured: Captured, sites: list[AttentionSite], config: Config, tol: float,
                    report: Report) -> list[tuple[AttentionSite, Variant, object]]:
    """Choose a variant per site, fit it where it needs calibration, check each candidate in
    isolation on values from the original graph, and keep the ones that pass.
    """
    candidates: list[tuple[AttentionSite, Variant]] = []
    refusals: dict[int, str] = {}
    for site in sites:
        variant = config.variant_for(site.location)
        if variant is None:
            report.rows.append(SiteResult(site, LEFT_EXACT, note="left as is by an override"))
            continue
        reason = implementation(variant).can_apply(variant, site)
        if reason is not None and not variant.exact:
            # An approximate variant that cannot express a site leaves it exact: fused, the
            # exact rewrite every site gets by default, when the site allows it.
            refusals[site.index] = f"{variant.describe()} not applied: {reason}"
            variant = Fused()
            reason = implementation(variant).can_apply(variant, site)
        if reason is not None:
            refused = refusals.get(site.index, "")
            note = refused if reason in refused else "; ".join(filter(None, [refused, reason]))
            report.rows.append(SiteResult(site, LEFT_EXACT, variant=variant.describe(),
                                          note=note))
            continue
        candidates.append((site, variant))
    if not candidates:
        return []
    states = _fit(captured, candidates, config, report)
    checks = {site.index: site_check_module(site, v, states.get(site.index))
              for site, v in candidates}
    wanted = {n for _, ins in checks.values() for n in ins}
    wanted |= {site.graph.output for site, _ in candidates}
    values = record(captured.gm, captured.flat(captured.inputs), wanted) if config.verify else {}
    plan = []
    for site, variant in candidates:
        exact = variant.exact
        impl = implementation(variant)
        row = SiteResult(site, FUSED if exact else REWRITTEN, variant=variant.describe(),
                         density=impl.density(variant, site))
        if site.index in refusals:
            row.note = refusals[site.index] + "; fused exactly instead"
        if config.verify:
            module, ins = checks[site.index]
            with torch.no_grad():
                out = module(*[values[n] for n in ins])
            row.error = compare(values[site.graph.output], out)
            if exact and row.error.rel > tol:
                row.outcome = REVERTED
                row.note = (f"exact rewrite error {row.error.rel:.2e} exceeds tolerance {tol:.0e};"
                            " site kept as the original code")
                log.warning("site %d (%s): %s", site.index, site.location, row.note)
        report.rows.append(row)
        if row.outcome != REVERTED:
            plan.append((site, variant, states.get(site.index)))
    report.rows.sort(key=lambda r: r.site.index)
    return plan


def _fit(captured: Captured, candidates: list[tuple[AttentionSite, Variant]], config: Config,
         report: Report) -> dict[int, object]:
    """Call ``fit`` of calibrated variants with each site's canonical tensors on calibration data.

    Calibration batches come from ``config.calibration`` (a list of example inputs shaped like
    the example's); without it the example inputs are used and the report says so.
    """
    to_fit = [(s, v) for s, v in candidates if wants_fit(v, config.calibration is not None)]
    if not to_fit:
        return {}
    batches = config.calibration
    if batches is None:
        batches = [captured.inputs]
        report.notes.append("no calibration data given: fitted on the example inputs only")
    elif not isinstance(batches, (list, tuple)) or isinstance(batches, Inputs):
        batches = [batches]
    modules = {site.index: site_operands_module(site) for site, _ in to_fit}
    wanted = {n for _, ins in modules.values() for n in ins} | {s.graph.output for s, _ in to_fit}
    samples: dict[int, list[dict]] = {site.index: [] for site, _ in to_fit}
    for batch in batches:
        inputs = normalize(batch)
        inputs = Inputs(inputs.args, {**captured.injected, **inputs.kwargs})
        values = record(captured.gm, captured.flat(inputs), wanted)
        for site, _ in to_fit:
            module, ins = modules[site.index]
            with torch.no_grad():
                q, k, v, mask = module(*[values[n] for n in ins])
                out = torch.ops.attnopt.attention(q, k, v, mask, site.causal, site.scale)
            samples[site.index].append({"q": q, "k": k, "v": v, "mask": mask, "causal": site.causal,
                                        "scale": site.scale, "out": out})
    states = {}
    for site, variant in to_fit:
        log.info("fitting %s at site %d (%s) on %d batches", variant.describe(), site.index,
                 site.location, len(batches))
        states[site.index] = implementation(variant).fit(variant, site, samples[site.index])
    return states


def _verify_end_to_end(model: torch.nn.Module, captured: Captured, report: Report,
                       tol: float) -> None:
    """Compare the rewritten graph with the original model on every input set."""
    names = ["example inputs", "resized inputs"]
    all_exact = report.count(REWRITTEN) == 0
    with eval_mode(model), torch.no_grad():
        for name, inputs in zip(names, captured.input_sets()):
            try:
                ref = inputs.call(model)
            except Exception as e:  # noqa: BLE001 - our resized inputs may not suit the model
                report.notes.append(f"not verified on {name} {inputs.describe()}: the original "
                                    f"model itself fails on them ({type(e).__name__})")
                continue
            out = inputs.call(captured.gm)
            err = compare(ref, out)
            report.end_to_end[f"{name} {inputs.describe()}"] = err
            if all_exact and err.rel > tol:
                _revert_all(captured, report,
                            f"end-to-end error {err.rel:.2e} on {name} exceeds {tol:.0e}")
                return


def _revert_all(captured: Captured, report: Report, why: str) -> None:
    """Throw the rewritten graph away: every site stays as the original code computed it."""
    log.warning("%s: reverting every site", why)
    captured.gm = captured.program.module()
    for row in report.rows:
        if row.outcome in (FUSED, REWRITTEN):
            row.outcome = REVERTED
            row.note = why
    report.notes.append(f"{why}: all sites reverted")


@contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    log.info("%s: %.2fs", name, timings[name])
