"""Plan: sites → (site, variant, fitted state) to rewrite, each checked in isolation.

Per site: the variant the config chooses (an approximate variant that cannot express the site
falls back to exact fusion, or raises in strict mode), calibration ``fit`` for variants that
need it, then a check of each candidate on values captured from the original graph; an exact
rewrite that exceeds the tolerance is left out and reported as reverted.
"""

from __future__ import annotations

import logging

import torch

from attnopt._inputs import Inputs, normalize
from attnopt.capture import Captured
from attnopt.config import Config
from attnopt.errors import VariantNotApplicableError
from attnopt.passes.rewrite_sites import site_check_module, site_operands_module
from attnopt.passes.static_sizes import static_symbols
from attnopt.report import FUSED, LEFT_EXACT, REVERTED, REWRITTEN, Report, SiteResult
from attnopt.sites import AttentionSite
from attnopt.variants import Fused, Variant, implementation
from attnopt.variants._base import wants_fit
from attnopt.verify import compare, record

log = logging.getLogger("attnopt")

Plan = list[tuple[AttentionSite, Variant, object]]


def plan_sites(captured: Captured, sites: list[AttentionSite], config: Config, tol: float,
               report: Report) -> Plan:
    """Choose, fit and check a variant per site; add a report row per site; return the plan.

    Raises:
        VariantNotApplicableError: ``config.strict`` and a variant the user chose cannot apply.
    """
    candidates, refusals = _choose(sites, config, report)
    if not candidates:
        return []
    captured.keep_static(static_symbols(candidates))
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
        state = states.get(site.index)
        fitted = hasattr(impl, "describe_state")  # variants whose density depends on the fit
        row = SiteResult(site, FUSED if exact else REWRITTEN, variant=variant.describe(),
                         density=impl.density(variant, site, state) if fitted
                         else impl.density(variant, site))
        if fitted:
            row.note = impl.describe_state(variant, site, state)
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


def _choose(sites: list[AttentionSite], config: Config, report: Report
            ) -> tuple[list[tuple[AttentionSite, Variant]], dict[int, str]]:
    """The variant per site; sites left exact get their report row here."""
    candidates: list[tuple[AttentionSite, Variant]] = []
    refusals: dict[int, str] = {}
    for site in sites:
        variant = config.variant_for(site.location)
        if variant is None:
            report.rows.append(SiteResult(site, LEFT_EXACT, note="left as is by an override"))
            continue
        forced = config.strict and config.forced(site.location)
        reason = variant.can_apply(site, raise_error=forced)
        if reason is None and site.softcap is not None and not variant.exact:
            reason = "soft-capped logits (only the exact path applies the cap)"
            if forced:
                raise VariantNotApplicableError(
                    f"{variant.describe()} cannot be applied to site {site.index} "
                    f"({site.location}): {reason}")
        if reason is not None and not variant.exact:
            # An approximate variant that cannot express a site leaves it exact: fused, the
            # exact rewrite every site gets by default, when the site allows it.
            refusals[site.index] = f"{variant.describe()} not applied: {reason}"
            variant = Fused()
            reason = variant.can_apply(site)
        if reason is not None:
            refused = refusals.get(site.index, "")
            note = refused if reason in refused else "; ".join(filter(None, [refused, reason]))
            report.rows.append(SiteResult(site, LEFT_EXACT, variant=variant.describe(),
                                          note=note))
            continue
        candidates.append((site, variant))
    return candidates, refusals


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
    # variants whose decision spans sites (e.g. a head budget over the whole model)
    for variant in dict.fromkeys(v for _, v in to_fit):
        impl = implementation(variant)
        if hasattr(impl, "fit_jointly"):
            group = {s.index: states[s.index] for s, v in to_fit if v == variant}
            states.update(impl.fit_jointly(variant, group))
    return states
