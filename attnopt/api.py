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
from attnopt._inputs import normalize
from attnopt._match.evaluate import Evaluator
from attnopt._match.matcher import Matcher
from attnopt.capture import Captured, capture
from attnopt.config import Config
from attnopt.errors import ConfigError
from attnopt.optimized import OptimizedModel
from attnopt.passes.rewrite_sites import rewrite_sites
from attnopt.plan import plan_sites
from attnopt.report import FUSED, LEFT_EXACT, REVERTED, REWRITTEN, Report
from attnopt.sites import AttentionSite, Rejected
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
        config: what to apply; ``Config()`` (exact fusion everywhere) when None.

    Returns:
        An :class:`OptimizedModel` with a ``report``.

    Raises:
        ConfigError: bad arguments.
        CaptureError: the model cannot be captured by torch.export.
        VariantNotApplicableError: ``config.strict`` and a variant the user chose cannot
            apply to a site.
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
    log.info("optimized %s: %d sites, %d fused, %d rewritten, %d left exact, %d reverted",
             report.model, len(report.rows), report.count(FUSED), report.count(REWRITTEN),
             report.count(LEFT_EXACT), report.count(REVERTED))
    call = CallSpec.from_capture(model.forward, captured.inputs, captured.injected)
    return OptimizedModel(captured.gm, captured, report, config, call)


# -- stages ------------------------------------------------------------------------------------


def _find(captured: Captured) -> tuple[list[AttentionSite], list[Rejected]]:
    captured.gm.graph.eliminate_dead_code()
    evaluator = Evaluator(captured.gm, [captured.flat(i) for i in captured.input_sets()])
    return Matcher(captured.gm, evaluator).find()


@contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    log.info("%s: %.2fs", name, timings[name])
