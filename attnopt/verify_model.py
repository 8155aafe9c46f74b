"""End-to-end verification of a rewritten graph against the original model, and the revert.

The comparisons themselves are in ``attnopt.verify``; this module runs the original model and
the rewritten graph on every input set (the example inputs, and inputs of another batch size /
sequence length) and, when only exact rewrites were made and the error exceeds the tolerance,
throws the rewritten graph away.
"""

from __future__ import annotations

import logging

import torch

from attnopt.capture import Captured, eval_mode, run_rewritten
from attnopt.report import FUSED, REVERTED, REWRITTEN, Report
from attnopt.verify import compare

log = logging.getLogger("attnopt")


def verify_end_to_end(model: torch.nn.Module, captured: Captured, report: Report,
                      tol: float) -> None:
    """Compare the rewritten graph with the original model on every input set."""
    names = ["example inputs", "resized inputs"]
    all_exact = report.count(REWRITTEN) == 0
    if captured.resize_note:
        report.notes.append(captured.resize_note)
    with eval_mode(model), torch.no_grad():
        for name, inputs in zip(names, captured.input_sets()):
            try:
                ref = inputs.call(model)
            except Exception as e:  # noqa: BLE001 - our resized inputs may not suit the model
                report.notes.append(f"not verified on {name} {inputs.describe()}: the original "
                                    f"model itself fails on them ({type(e).__name__})")
                continue
            run = run_rewritten(captured, inputs)
            if run.failure is not None:
                if run.rewrite_at_fault:
                    revert_all(captured, report, f"{run.failure} on {name}")
                    return
                report.notes.append(f"not verified on {name} {inputs.describe()}: "
                                    f"{run.failure}")
                captured.drop_alt_inputs(run.failure)
                continue
            out = run.output
            err = compare(ref, out)
            report.end_to_end[f"{name} {inputs.describe()}"] = err
            if all_exact and err.rel > tol:
                revert_all(captured, report,
                           f"end-to-end error {err.rel:.2e} on {name} exceeds {tol:.0e}")
                return


def revert_all(captured: Captured, report: Report, why: str) -> None:
    """Throw the rewritten graph away: every site stays as the original code computed it."""
    log.warning("%s: reverting every site", why)
    captured.gm = captured.program.module()
    for row in report.rows:
        if row.outcome in (FUSED, REWRITTEN):
            row.outcome = REVERTED
            row.note = why
    report.notes.append(f"{why}: all sites reverted")
