"""The public pipeline, in order: capture → find → plan (choose, fit, check) → rewrite → verify.

Each stage lives in its own module: ``capture``, ``_match``, ``plan``, ``passes.rewrite_sites``,
``verify_model``; the result is an :class:`attnopt.optimized.OptimizedModel`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any

import torch

from attnopt._call import CallSpec
from attnopt._inputs import Inputs, normalize
from attnopt._match.evaluate import Evaluator
from attnopt._match.matcher import Matcher
from attnopt.auto import Auto, optimize_auto
from attnopt.capture import Captured, capture
from attnopt.config import Config, check_overrides
from attnopt.errors import CaptureError, ConfigError
from attnopt.optimized import OptimizedModel
from attnopt.passes.rewrite_sites import rewrite_sites
from attnopt.plan import plan_sites
from attnopt.report import FUSED, LEFT_EXACT, REVERTED, REWRITTEN, Report, unapplied_variants
from attnopt.sites import AttentionSite, Rejected
from attnopt.variants._base import NeedsStaticShapes
from attnopt.verify import default_tolerance, model_dtype
from attnopt.verify_model import verify_end_to_end

log = logging.getLogger("attnopt")


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
        config: what to apply; ``Config()`` (exact fusion everywhere) when None; or an
            :class:`attnopt.Auto` accuracy budget, which searches a per-site plan (see
            ``attnopt.auto``; the plan is ``fast.config``, the search ``fast.report.auto``).

    Returns:
        An :class:`OptimizedModel` with a ``report``.

    Raises:
        ConfigError: bad arguments.
        CaptureError: the model cannot be captured by torch.export.
        VariantNotApplicableError: ``config.strict`` and a variant the user chose cannot
            apply to a site.
    """
    config = Config() if config is None else config
    if isinstance(config, Auto):
        return optimize_auto(model, example_inputs, config)
    if not isinstance(config, Config):
        raise ConfigError(f"config must be an attnopt.Config or an attnopt.Auto budget, got "
                          f"{type(config).__name__}")
    inputs = normalize(example_inputs)
    timings: dict[str, float] = {}
    with _timed(timings, "capture"):
        captured = capture(model, inputs, dynamic=config.dynamic)
    with _timed(timings, "find"):
        sites, rejected = _find(captured)
    if captured.dynamic and (why := _static_wanted(sites, config)):
        with _timed(timings, "capture static"):
            captured, sites, rejected = _recapture_static(model, inputs, why, captured, sites,
                                                          rejected)
    check_overrides(config, [s.location for s in sites])
    tol = config.tolerance or default_tolerance(model_dtype(model))
    report = Report(model=type(model).__name__, rejected=list(rejected), tolerance=tol,
                    notes=list(captured.notes), timings=timings)
    with _timed(timings, "plan+check"):
        plan = plan_sites(captured, sites, config, tol, report)
    with _timed(timings, "rewrite"):
        rewrite_sites(captured.gm, plan)
    if config.verify and plan:
        with _timed(timings, "verify"):
            verify_end_to_end(model, captured, report, tol)
    for line in unapplied_variants(report, config.variant_for):
        log.warning(line)
        report.warnings.append(line)
    log.info("optimized %s: %d sites, %d fused, %d rewritten, %d left exact, %d reverted",
             report.model, len(report.rows), report.count(FUSED), report.count(REWRITTEN),
             report.count(LEFT_EXACT), report.count(REVERTED))
    call = CallSpec.from_capture(model.forward, captured.inputs, captured.injected)
    fast = OptimizedModel(captured.gm, captured, report, config, call)
    # Kept outside the module tree (no second copy in state_dict): export_decoder captures the
    # source model again, with a KV cache.
    fast.__dict__["source_model"] = model
    return fast


# -- stages ------------------------------------------------------------------------------------


def _find(captured: Captured) -> tuple[list[AttentionSite], list[Rejected]]:
    captured.gm.graph.eliminate_dead_code()
    evaluator = Evaluator(captured.gm, [captured.flat(i) for i in captured.input_sets()])
    return Matcher(captured.gm, evaluator).find()


def _static_wanted(sites: list[AttentionSite], config: Config) -> str:
    """Why a capture with static shapes is needed ('' if not): a variant refused a site with
    :class:`NeedsStaticShapes` (e.g. a patch grid that is not readable at run time).
    """
    for site in sites:
        variant = config.variant_for(site.location)
        if variant is not None and site.fusable:
            reason = variant.can_apply(site)
            if isinstance(reason, NeedsStaticShapes):
                return f"{variant.describe()} at {site.location}: {reason}"
    return ""


def _recapture_static(model: torch.nn.Module, inputs: Inputs, why: str, captured: Captured,
                      sites: list[AttentionSite], rejected: list[Rejected]):
    """Capture again with static shapes (see :func:`_static_wanted`); keep the dynamic capture
    when that fails.
    """
    try:
        static = capture(model, inputs, dynamic=False)
    except CaptureError as e:
        captured.notes.append(f"{why}; a static capture failed too: {str(e).splitlines()[0]}")
        return captured, sites, rejected
    log.warning("%s: capturing again with static shapes", why)
    static.notes.append(f"captured again with static shapes ({why}): the model is valid for "
                        "the example's shapes only")
    return static, *_find(static)


@contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    log.info("%s: %.2fs", name, timings[name])
