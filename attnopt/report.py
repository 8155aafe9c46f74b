"""Reports: one row per attention site (where, what was found, what it became, measured error).

Rendered as a text table (CLI, ``print(report)``) and available as data (``to_dict`` / JSON).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnopt.sites import AttentionSite, Rejected
from attnopt.verify import ErrorStats

if TYPE_CHECKING:
    from attnopt.variants import Variant

# Row outcomes.
FUSED = "fused"
REWRITTEN = "rewritten"
LEFT_EXACT = "left exact"
REVERTED = "reverted"


@dataclass
class SiteResult:
    """What happened to one site.

    Attributes:
        site: the site as found.
        outcome: ``fused`` / ``rewritten`` (approximate variant) / ``left exact`` / ``reverted``.
        variant: the variant applied (its description), or None.
        error: measured error of the site's output in isolation (example inputs).
        density: fraction of query-key pairs computed (1.0 for exact attention).
        note: why the site was left exact or reverted.
    """

    site: AttentionSite
    outcome: str
    variant: str | None = None
    error: ErrorStats | None = None
    density: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            **self.site.to_dict(),
            "outcome": self.outcome,
            "variant": self.variant,
            "error": self.error.to_dict() if self.error else None,
            "density": self.density,
            "note": self.note,
        }


@dataclass
class Report:
    """The result of ``find_attention`` / ``optimize`` on one model."""

    model: str
    rows: list[SiteResult] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    end_to_end: dict[str, ErrorStats] = field(default_factory=dict)
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: the search of an ``attnopt.Auto`` budget (an ``attnopt.auto.AutoResult``), when one ran
    auto: Any = None

    @property
    def sites(self) -> list[AttentionSite]:
        """All attention sites found."""
        return [r.site for r in self.rows]

    def count(self, outcome: str) -> int:
        """Number of sites with ``outcome``."""
        return sum(r.outcome == outcome for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain data."""
        return {
            "model": self.model,
            "summary": {
                "sites": len(self.rows),
                FUSED: self.count(FUSED),
                REWRITTEN: self.count(REWRITTEN),
                LEFT_EXACT: self.count(LEFT_EXACT),
                REVERTED: self.count(REVERTED),
                "other_softmax": len(self.rejected),
            },
            "sites": [r.to_dict() for r in self.rows],
            "other_softmax": [r.to_dict() for r in self.rejected],
            "end_to_end": {k: v.to_dict() for k, v in self.end_to_end.items()},
            "tolerance": self.tolerance,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "timings_s": dict(self.timings),
            **({"auto": self.auto.to_dict()} if self.auto is not None else {}),
        }

    def to_json(self, **kwargs: Any) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def table(self) -> str:
        """The report as a text table."""
        header = ["#", "location", "pattern", "kind", "heads", "dim", "Lq x Lk", "scale", "mask",
                  "result", "error"]
        body = [_row(r) for r in self.rows]
        lines = [f"attnopt report: {self.model}"]
        lines += _render([header] + body) if body else ["  no attention found"]
        summary = (f"{len(self.rows)} attention sites: {self.count(FUSED)} fused, "
                   f"{self.count(REWRITTEN)} rewritten, {self.count(LEFT_EXACT)} left exact, "
                   f"{self.count(REVERTED)} reverted")
        lines.append(summary)
        lines += [f"warning: {w}" for w in self.warnings]
        # The tolerance bounds exact rewrites only: next to the error of an approximate model it
        # would read as a failed check.
        approximate = self.count(REWRITTEN) > 0
        for name, err in self.end_to_end.items():
            lines.append(f"end-to-end error on {name}: {err.rel:.2e} (max abs {err.max_abs:.2e}, "
                         f"cosine {err.cosine:.6f})"
                         + (", approximate: measured, not bounded" if approximate
                            else f", tolerance {self.tolerance:.0e}" if self.tolerance else ""))
        for r in self.rows:
            if r.note:
                lines.append(f"  site {r.site.index} ({r.site.location}): {r.note}")
            if r.error is not None and r.error.nan_in_reference:
                lines.append(f"  site {r.site.index} ({r.site.location}): "
                             f"{_nan_note(r.error.nan_in_reference)}")
        nan_e2e = max((e.nan_in_reference for e in self.end_to_end.values()), default=0)
        if nan_e2e:
            lines.append(f"end to end: {_nan_note(nan_e2e)}")
        if self.rejected:
            lines.append(f"{len(self.rejected)} other softmax ops, not attention (left alone):")
            for rej in self.rejected:
                lines.append(f"  {rej.location}: {rej.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def unapplied_variants(report: Report, variant_for: Callable[[str], Variant | None],
                       ) -> list[str]:
    """One line per variant the user asked for that ended up applied to no site.

    ``variant_for`` maps a site's location to the variant asked for there
    (:meth:`attnopt.Config.variant_for`); the default exact fusion is not a request. A line
    reads ``"Neighborhood2D(kernel=7) applied to 0 of 12 sites: <the most common reason>"``.
    """
    from attnopt.variants import Fused

    asked: dict[str, list[SiteResult]] = {}
    for row in report.rows:
        v = variant_for(row.site.location)
        if v is not None and not isinstance(v, Fused):
            asked.setdefault(v.describe(), []).append(row)
    lines = []
    for name, rows in asked.items():
        if any(r.variant == name and r.outcome in (FUSED, REWRITTEN) for r in rows):
            continue
        reasons = Counter(_refusal(r.note or r.outcome, name) for r in rows)
        reason, _ = reasons.most_common(1)[0]
        lines.append(f"{name} applied to 0 of {len(rows)} sites: {reason}")
    return lines


def _refusal(note: str, name: str) -> str:
    """The variant's own reason out of a row note (``"<name> not applied: <why>; ..."``)."""
    head = f"{name} not applied: "
    if note.startswith(head):
        note = note[len(head):]
    return note.removesuffix("; fused exactly instead")


def _row(r: SiteResult) -> list[str]:
    s = r.site
    heads = "-" if s.heads is None else (
        str(s.heads) if s.kv_heads in (None, s.heads) else f"{s.heads}/{s.kv_heads}")
    lens = f"{_n(s.q_len)} x {_n(s.kv_len)}"
    result = r.variant if r.outcome == REWRITTEN and r.variant else r.outcome
    if r.outcome == FUSED and s.already_fused:
        result = "fused (was sdpa)"
    if r.density is not None and (r.density < 1.0 or r.outcome == REWRITTEN):
        result += f" d={r.density:.2f}"
    err = "-" if r.error is None else f"{r.error.rel:.1e}"
    pattern = s.spelling if len(s.spelling) <= 60 else s.spelling[:57] + "..."
    return [str(s.index), s.location, pattern, s.kind, heads, _n(s.head_dim), lens,
            "-" if s.scale is None else f"{s.scale:.4g}", s.mask, result, err]


def _nan_note(count: int) -> str:
    return (f"{count} output values are NaN in the original model (rows whose keys are all "
            "masked, e.g. fully padded sequences) and finite after the rewrite; they are "
            "excluded from the error")


def _n(x: Any) -> str:
    return "?" if x is None else str(x)


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out
